"""The point-cloud modalities: "pointcloud" (objects, scenes; Point-MAE) and "lidar"
(sweeps around a sensor; R-MAE's radial masking and occupancy target).

decode    record bytes -> checked `Cloud` (+ optional open3d preprocessing)
tokenize  Cloud -> sample `num_points` -> normalise -> augment (train) ->
          FPS + kNN groups: values [G, k*(3+F)], coords [G, 3] centres
render    original | visible groups | reconstruction, each as top, front and
          side scatter views (numpy + PIL)

Note on data: no spinning-LiDAR sweep ships inside a Python package, so the
built-in "laspy-sweeps" source cuts real airborne scans (laspy's test files)
into discs around a pseudo-sensor at each disc centre. Radial masking and the
sensor-centred normalisation then behave as on a sweep (azimuth sectors
around the sensor), but the point density does not fall with range as a
real sweep's does. A folder of KITTI .bin sweeps is read the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.modality import Modality
from polymae.shared.model import DecoderConfig, ModelConfig
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Tokens

from . import adapters
from . import masking as _masking  # noqa: F401  (registers point_block and radial)
from . import objectives as _objectives  # noqa: F401  (registers chamfer and occupancy)
from .model import PointDecoder, PointInputAdapter
from .tokenizer import tokenize_points, untokenize_points

NORMALISATIONS = ("unit_sphere", "sensor", "scale")


@dataclass
class PointCloudOptions:
    # tokenizer
    num_points: int = 1024                 # points drawn at random from a cloud before grouping (all if fewer)
    num_groups: int = 64                   # G: group centres by farthest point sampling
    group_size: int = 32                   # k: nearest neighbours per centre
    features: tuple[str, ...] = ()         # extra per-point features, in order: rgb, intensity, normals
    normalize: str = "unit_sphere"         # unit_sphere: centroid at 0, radius 1 (Point-MAE);
                                           # sensor: sensor_origin at 0, farthest horizontal range 1 (LiDAR);
                                           # scale: coordinates divided by `scale`, not moved
    sensor_origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # in the file's coordinates
    scale: float = 1.0
    group_scale: float = 1.0               # group points relative to their centre are divided by this
    rotate: bool = True                    # training: random rotation about the vertical (z) axis
    scale_range: tuple[float, float] = (0.9, 1.1)  # training: random isotropic scale
    # open3d preprocessing when a record is decoded
    voxel_size: float | None = None        # voxel down-sampling (features averaged per voxel)
    outlier_neighbors: int = 0             # > 0: statistical outlier removal with this many neighbours
    outlier_std: float = 2.0
    estimate_normals: bool = False         # compute normals (needed for features: [normals] on xyz files)
    normal_neighbors: int = 16
    # reading sources (`polymae shard`)
    tile_points: int = 2048                # scans with > 2x this many points are cut into tiles of about this many
    tile_size: float | None = None         # fixed tile side in the scan's units; None: from tile_points
    min_tile_points: int = 256             # sparser tiles (scan edges) are reported and not written
    # model
    embed_hidden: int = 256                # mini-PointNet width h (Point-MAE: 256; 128 is 4x cheaper)
    occupancy_grid: int = 0                # > 0: an occupancy head over grid^3 voxels per group (R-MAE)

    def __post_init__(self):
        self.features = tuple(self.features)
        unknown = [f for f in self.features if f not in adapters.FEATURE_WIDTHS]
        if unknown or len(set(self.features)) != len(self.features):
            raise ConfigError(f"modality_options.features {list(self.features)}: each at most once, from "
                              f"{', '.join(adapters.FEATURE_WIDTHS)}")
        if self.normalize not in NORMALISATIONS:
            raise ConfigError(f"modality_options.normalize must be one of {', '.join(NORMALISATIONS)}; "
                              f"got {self.normalize!r}")
        if self.num_groups < 2 or self.group_size < 1:
            raise ConfigError(f"modality_options.num_groups ({self.num_groups}) must be >= 2 and group_size "
                              f"({self.group_size}) >= 1")
        if self.num_points < self.group_size:
            raise ConfigError(f"modality_options.num_points ({self.num_points}) must be at least group_size "
                              f"({self.group_size})")
        if self.scale <= 0 or self.group_scale <= 0:
            raise ConfigError("modality_options.scale and group_scale must be positive")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"modality_options.scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if len(self.sensor_origin) != 3:
            raise ConfigError(f"modality_options.sensor_origin needs 3 values, got {self.sensor_origin}")
        if self.embed_hidden < 2 or self.embed_hidden % 2:
            raise ConfigError(f"modality_options.embed_hidden must be an even number >= 2, got {self.embed_hidden}")
        if self.occupancy_grid < 0 or self.occupancy_grid > 16:
            raise ConfigError(f"modality_options.occupancy_grid must be in 0..16, got {self.occupancy_grid}")

    @property
    def point_dim(self) -> int:
        return 3 + sum(adapters.FEATURE_WIDTHS[f] for f in self.features)


@dataclass
class LidarOptions(PointCloudOptions):
    num_points: int = 2048
    normalize: str = "sensor"
    occupancy_grid: int = 4
    tile_points: int = 2048


@MODALITIES.register("pointcloud")
class PointCloudModality(Modality):
    name = "pointcloud"
    payload_keys = ("points.npz", "points.npy", "points.ply", "points.pcd", "points.las", "points.laz",
                    "lidar.bin", "npz", "npy", "ply", "pcd", "las", "laz", "bin")
    Options = PointCloudOptions
    default_masker = "random"

    @property
    def default_objective(self) -> dict:
        terms = {"chamfer": {"weight": 1.0}}
        if self.options.occupancy_grid:
            terms["occupancy"] = {"weight": 1.0}
        return terms

    # -- adapters ---------------------------------------------------------
    def sources(self):
        return dict(adapters.BUILTIN_SOURCES)

    def tile_settings(self) -> adapters.TileSettings:
        o = self.options
        return adapters.TileSettings(tile_points=o.tile_points, tile_size=o.tile_size,
                                     min_tile_points=o.min_tile_points)

    def read_source(self, source, **kwargs):
        return adapters.read_source(source, self.tile_settings())

    def decode(self, sample) -> adapters.Cloud:
        key, data = self.payload(sample)
        record = f"{sample.get('__key__', '?')}.{key}"  # names the file: the source file, or shard:record
        source = str(sample.get("__source__") or (f"{sample['__url__']}:{record}" if "__url__" in sample else record))
        o = self.options
        cloud = adapters.decode_points(data, key, source)
        cloud = adapters.preprocess(cloud, o.voxel_size, o.outlier_neighbors, o.outlier_std, o.estimate_normals,
                                    o.normal_neighbors)
        if len(cloud) < o.group_size:
            raise BadInput(source, f"has {len(cloud)} points, fewer than one group of group_size={o.group_size}",
                           "too_few_points")
        cloud.columns(o.features, source)  # raises missing_feature naming the file
        return cloud

    # -- tokenizer --------------------------------------------------------
    def points(self, cloud: adapters.Cloud, generator: torch.Generator, train: bool) -> torch.Tensor:
        """Cloud -> normalised (and, training, augmented) float32 points [n, 3 + F]."""
        o = self.options
        if len(cloud) < o.group_size:
            raise BadInput("cloud", f"has {len(cloud)} points, fewer than one group of group_size={o.group_size}",
                           "too_few_points")
        if len(cloud) > o.num_points:
            cloud = cloud.subset(np.sort(torch.randperm(len(cloud), generator=generator)[: o.num_points].numpy()))
        xyz = cloud.xyz
        if o.normalize == "unit_sphere":
            xyz = xyz - xyz.mean(axis=0)
            xyz = xyz / max(float(np.linalg.norm(xyz, axis=1).max()), 1e-9)
        elif o.normalize == "sensor":  # by horizontal range: a stray point far below ground cannot shrink it
            xyz = xyz + (cloud.origin - np.asarray(o.sensor_origin, dtype=np.float64))
            xyz = xyz / max(float(np.linalg.norm(xyz[:, :2], axis=1).max()), 1e-9)
        else:
            xyz = xyz / o.scale
        cloud = adapters.Cloud(xyz, cloud.features, cloud.origin)
        points = torch.from_numpy(cloud.columns(o.features))
        if train:
            points = self.augment(points, generator)
        return points

    def augment(self, points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        o = self.options
        points = points.clone()
        if o.rotate:
            angle = float(torch.rand((), generator=generator)) * 2 * math.pi
            c, s = math.cos(angle), math.sin(angle)
            rotation = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
            points[:, :3] = points[:, :3] @ rotation.T
            start = self.feature_column("normals")
            if start is not None:  # normals turn with the points
                points[:, start:start + 3] = points[:, start:start + 3] @ rotation.T
        low, high = o.scale_range
        if high > low:
            points[:, :3] *= low + (high - low) * float(torch.rand((), generator=generator))
        return points

    def feature_column(self, name: str) -> int | None:
        """Where feature `name` starts in a point's values (xyz first), or None when not used."""
        features = self.options.features
        if name not in features:
            return None
        return 3 + sum(adapters.FEATURE_WIDTHS[f] for f in features[: features.index(name)])

    def tokenize(self, payload, generator, train=True):
        points = self.points(payload, generator, train)
        start = int(torch.randint(0, len(points), (1,), generator=generator)) if train else 0
        return tokenize_points(points, self.options.num_groups, self.options.group_size, self.options.group_scale,
                               start)

    def untokenize(self, tokens: Tokens) -> torch.Tensor:
        """Tokens -> points [(B,) G*k, 3 + F] in the normalised frame of `tokenize`."""
        return untokenize_points(tokens.values.float(), tokens.coords.float(), self.options.group_size,
                                 self.options.group_scale)

    @property
    def d_in(self):
        return self.options.group_size * self.options.point_dim

    @property
    def num_coords(self):
        return 3

    # -- model --------------------------------------------------------------
    def input_adapter(self, width: int, config: ModelConfig) -> PointInputAdapter:
        if config.position == "learned":
            raise ConfigError("model.position: point groups have no fixed grid for a learned table; "
                              "use mlp (Point-MAE) or sincos")
        o = self.options
        return PointInputAdapter(o.point_dim, o.group_size, width, config.position, o.embed_hidden)

    def decoder(self, decoder: DecoderConfig, encoder_width: int, config: ModelConfig) -> PointDecoder:
        if (decoder.kind or "transformer") != "transformer":
            raise ConfigError(f"point groups are decoded by a transformer decoder, not {decoder.kind!r}")
        o = self.options
        return PointDecoder(encoder_width, o.point_dim, o.group_size, config, decoder, o.occupancy_grid)

    # -- pictures -------------------------------------------------------------
    def render(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int = 8) -> Image.Image:
        """Rows of original | visible groups | reconstruction (visible groups + predicted
        hidden groups in red), each panel as top (x-y), front (x-z) and side (y-z) views."""
        rows = min(rows, tokens.values.shape[0])
        k = self.options.group_size
        true = self.untokenize(Tokens(tokens.values[:rows], tokens.coords[:rows])).numpy()
        guess = self.untokenize(Tokens(pred[:rows].float(), tokens.coords[:rows])).numpy()
        hidden = hidden[:rows].cpu().numpy().repeat(k, axis=1)  # per point
        rgb_at = self.feature_column("rgb")
        lines = []
        for i in range(rows):
            xyz, colours = true[i][:, :3], point_colours(true[i], rgb_at)
            shown = ~hidden[i]
            panels = [(xyz, colours),
                      (xyz[shown], colours[shown]),
                      (np.concatenate([xyz[shown], guess[i][hidden[i], :3]]),
                       np.concatenate([colours[shown], np.tile(RECONSTRUCTED, (int(hidden[i].sum()), 1))]))]
            # the view box leaves out the 0.5% most extreme points (a stray point would shrink the rest)
            low, high = np.percentile(xyz, 0.5, axis=0), np.percentile(xyz, 99.5, axis=0)
            lines.append(np.concatenate([view for p, c in panels for view in three_views(p, c, low, high)], axis=1))
        body = np.concatenate(lines, axis=0)
        picture = Image.new("RGB", (body.shape[1], body.shape[0] + HEADER), (255, 255, 255))
        picture.paste(Image.fromarray(body), (0, HEADER))
        draw = ImageDraw.Draw(picture)
        labels = ["original: top", "front", "side", "visible groups: top", "front", "side",
                  "reconstruction: top", "front", "side (red: predicted)"]
        for v, label in enumerate(labels):
            draw.text((v * VIEW + 4, 2), label, fill=(0, 0, 0))
        return picture


@MODALITIES.register("lidar")
class LidarModality(PointCloudModality):
    """LiDAR sweeps: sensor-centred normalisation, R-MAE radial masking by default, and
    an occupancy head (occupancy_grid=4) trained with the occupancy term beside Chamfer."""

    name = "lidar"
    payload_keys = ("lidar.bin",) + tuple(k for k in PointCloudModality.payload_keys if k != "lidar.bin")
    Options = LidarOptions
    default_masker = "radial"


# -- drawing -----------------------------------------------------------------------------------

VIEW, MARGIN, HEADER = 160, 8, 14
BACKGROUND = np.array([250, 250, 250], dtype=np.uint8)
RECONSTRUCTED = np.array([220, 40, 40], dtype=np.uint8)
RAMP = np.array([[48, 18, 59], [50, 100, 210], [40, 170, 160], [120, 200, 80], [230, 190, 40]], dtype=np.float64)


def point_colours(points: np.ndarray, rgb_at: int | None) -> np.ndarray:
    """uint8 [n, 3]: the points' own colours when they have them, else a height ramp."""
    if rgb_at is not None:
        return (np.clip(points[:, rgb_at:rgb_at + 3], 0, 1) * 255).astype(np.uint8)
    z = points[:, 2]
    t = (z - z.min()) / max(float(np.ptp(z)), 1e-9) * (len(RAMP) - 1)
    low = np.floor(t).astype(int).clip(0, len(RAMP) - 2)
    frac = (t - low)[:, None]
    return (RAMP[low] * (1 - frac) + RAMP[low + 1] * frac).astype(np.uint8)


def three_views(xyz: np.ndarray, colours: np.ndarray, low: np.ndarray, high: np.ndarray) -> list[np.ndarray]:
    """Top (x right, y up), front (x right, z up) and side (y right, z up) scatter views of the
    box low..high (the original's), one scale for all three, nearer points drawn last."""
    scale = (VIEW - 2 * MARGIN) / max(float((high - low).max()), 1e-9)
    centre = (low + high) / 2
    views = []
    for right, up, depth, near_is_high in ((0, 1, 2, True), (0, 2, 1, False), (1, 2, 0, True)):
        image = np.empty((VIEW, VIEW, 3), dtype=np.uint8)
        image[:] = BACKGROUND
        image[:, -1] = image[-1, :] = 200  # thin frame between views
        if len(xyz):
            u = np.round((xyz[:, right] - centre[right]) * scale + VIEW / 2).astype(int)
            v = np.round(VIEW / 2 - (xyz[:, up] - centre[up]) * scale).astype(int)
            order = np.argsort(xyz[:, depth] if near_is_high else -xyz[:, depth], kind="stable")
            # 2x2 splats, written in depth order in one assignment (the last write wins)
            uu = (u[order, None] + np.array([0, 1, 0, 1])).ravel()
            vv = (v[order, None] + np.array([0, 0, 1, 1])).ravel()
            cc = np.repeat(colours[order], 4, axis=0)
            inside = (uu >= 0) & (uu < VIEW - 1) & (vv >= 0) & (vv < VIEW - 1)
            image[vv[inside], uu[inside]] = cc[inside]
        views.append(image)
    return views
