"""Voxel-grid dataset adapters: raw sources -> Samples, and Sample bytes -> grids.

A radiance/density grid is a dense float array [C, X, Y, Z]: RGB + density
(NeRF-MAE's radiance and density grid), density alone, or any C channels.
A Sample is `{"__key__", "grid.npz" | "grid.npy": bytes, "meta.json"}`;
an .npz holds the grid under "grid" (or as its only array), a 3D array is one
channel.

Sources (`read_source`):
  a folder / a file  .npz / .npy grids, and coloured point clouds (.ply, .pcd
                     through open3d; .las, .laz through laspy) voxelised into
                     tiles of `grid_size` voxels: per voxel the mean colour
                     and the density log(1 + points in the voxel)
  mni152             REAL: nilearn's bundled MNI152 2009 template (T1, grey-
                     and white-matter maps at 2 mm), each cut into 8 overlapping
                     64^3 sub-volumes: 24 density grids (C=1)
  laspy-lidar        REAL: the coloured airborne scans among laspy 2.7.0's
                     test files (Autzen stadium and others), voxelised into
                     RGB + density tiles (C=4). They ship only in laspy's
                     source distribution: `fetch_laspy_test_scans` downloads
                     it through pip (the package registry) once and caches it
                     under $POLYMAE_CACHE (default ~/.cache/polymae).

Voxelisation (`tile_scan`): global voxel indices g = floor((p - origin) / v)
from the scan's lowest corner; xy is cut into tiles of X x Y voxel columns;
each tile column starts at its lowest point (terrain following) and is cut
into Z-voxel layers. Every point lands in exactly one voxel of one tile;
tiles with fewer than `min_points` points are left out, and the points they
held are counted in every sample's meta.json of that scan.

Every failure raises `BadInput(source, problem, kind)` naming the file; kinds:
empty_grid, corrupt_grid, missing_array, wrong_dtype, wrong_ndim,
nonfinite_grid, unreadable_points, empty_cloud, nonfinite_points,
missing_colour, missing_source.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from polymae.modalities.pointcloud.packaged import LASPY_VERSION, fetch_laspy_test_scans  # noqa: F401
from polymae.shared.errors import BadInput
from polymae.shared.packaged_data import PackagedDataError
from polymae.shared.sources import SourceSamples, sample_key

GRID_SUFFIXES = {".npz": "grid.npz", ".npy": "grid.npy"}
CLOUD_SUFFIXES = (".ply", ".pcd", ".las", ".laz")
# laspy's test files with real colour (the rest have no RGB, all-zero RGB, a
# handful of points, or repeat these points in another format)
LASPY_SCANS = ("autzen_trim.laz", "append-bug.laz", "simple1_4.las")
MNI_TEMPLATES = ("t1", "gm", "wm")
MNI_CROP = 64
BUILTIN_SOURCES = {
    "mni152": "nilearn's MNI152 brain template (T1, grey and white matter, 2 mm) as 24 density sub-volumes of 64^3",
    "laspy-lidar": f"laspy {LASPY_VERSION}'s coloured airborne LiDAR test scans, voxelised into RGB + density "
                   "tiles (fetched once through pip)",
}


@dataclass
class Voxelisation:
    """How point clouds become grids (the modality fills it from its options)."""

    grid_size: tuple[int, int, int] = (32, 32, 16)  # tile shape in voxels
    voxel_size: float | None = None                  # scan units; None: ~4 points per occupied xy column
    channels: int = 4                                # 4: RGB + density; 1: density only
    min_points: int = 64                             # sparser tiles are left out (counted in meta.json)


# -- grids: bytes <-> arrays ------------------------------------------------------------------------

def encode_grid(grid: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, grid=np.asarray(grid, dtype=np.float32))
    return buffer.getvalue()


def check_grid(array, source: str) -> np.ndarray:
    """Any array -> float32 [C, X, Y, Z] (a 3D array is one channel), or BadInput naming `source`."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = getattr(getattr(array, "dtype", None), "name", type(array).__name__)
        raise BadInput(source, f"grid has dtype {kind}; expected integers or floats", "wrong_dtype")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise BadInput(source, f"grid has {array.ndim} dimensions (shape {array.shape}); expected [C, X, Y, Z] "
                       "(or [X, Y, Z] for one channel)", "wrong_ndim")
    if array.size == 0:
        raise BadInput(source, f"grid is empty (shape {array.shape})", "empty_grid")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        raise BadInput(source, f"grid holds {int(array.size - finite.sum())} NaN or infinite values "
                       f"(of {array.size})", "nonfinite_grid")
    return array


def decode_grid(data: bytes, source: str, suffix: str = ".npz") -> np.ndarray:
    """.npz / .npy bytes -> float32 [C, X, Y, Z]; BadInput names `source` and the problem."""
    if not data:
        raise BadInput(source, "grid file is empty (0 bytes)", "empty_grid")
    try:
        if suffix.lstrip(".").lower() == "npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                names = list(archive.files)
                name = "grid" if "grid" in names else (names[0] if len(names) == 1 else None)
                if name is None:
                    raise BadInput(source, f"npz holds arrays {names}; expected one named 'grid'", "missing_array")
                array = archive[name]
        else:
            array = np.load(io.BytesIO(data), allow_pickle=False)
    except BadInput:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as error:
        raise BadInput(source, f"cannot read the grid ({type(error).__name__}: {error})", "corrupt_grid") from None
    return check_grid(array, source)


# -- voxelisation ---------------------------------------------------------------------------------

def voxel_indices(points: np.ndarray, origin: np.ndarray, voxel_size: float) -> np.ndarray:
    """int64 [P, 3]: the voxel each point falls in, floor((p - origin) / voxel_size)."""
    return np.floor((np.asarray(points, np.float64) - np.asarray(origin, np.float64)) / voxel_size).astype(np.int64)


def voxelise_indices(index: np.ndarray, colours: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray:
    """Points already binned (index [P, 3] inside `shape`) -> grid [C, X, Y, Z]: mean colour per
    voxel (when `colours` [P, k] is given) and density log(1 + count) as the last channel."""
    shape = tuple(int(s) for s in shape)
    if len(index) and ((index < 0).any() or (index >= np.array(shape)).any()):
        raise ValueError(f"voxel indices outside a {shape} grid")
    linear = np.ravel_multi_index(index.T, shape) if len(index) else np.zeros(0, np.int64)
    size = int(np.prod(shape))
    counts = np.bincount(linear, minlength=size).astype(np.float64)
    channels = []
    if colours is not None:
        for c in range(colours.shape[1]):
            sums = np.bincount(linear, weights=colours[:, c], minlength=size)
            channels.append(np.divide(sums, counts, out=np.zeros(size), where=counts > 0))
    channels.append(np.log1p(counts))
    return np.stack(channels).reshape(len(channels), *shape).astype(np.float32)


def voxelise(points: np.ndarray, colours: np.ndarray | None, origin, voxel_size: float,
             shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Points [P, 3] -> (grid [C, X, Y, Z], inside [P] bool): the points inside the box
    origin + [0, shape * voxel_size) binned as `voxelise_indices` does."""
    index = voxel_indices(points, origin, voxel_size)
    inside = ((index >= 0) & (index < np.array(shape))).all(axis=1)
    grid = voxelise_indices(index[inside], None if colours is None else colours[inside], shape)
    return grid, inside


def auto_voxel_size(points: np.ndarray, per_column: float = 4.0, rounds: int = 4) -> float:
    """A voxel edge giving about `per_column` points per occupied xy voxel column, to two
    significant digits. Starts from sqrt(xy box area / points) and corrects by the occupied
    columns found, so a scan with empty regions or a few far outliers still gets dense tiles."""
    xy = np.asarray(points, np.float64)[:, :2]
    extent = np.ptp(xy, axis=0)
    size = math.sqrt(max(float(extent[0]) * float(extent[1]), 1e-12) / max(len(xy), 1)) * math.sqrt(per_column)
    for _ in range(rounds):
        occupied = len(np.unique(np.floor((xy - xy.min(axis=0)) / size).astype(np.int64), axis=0))
        size *= math.sqrt(per_column / (len(xy) / occupied))
    digits = 1 - int(math.floor(math.log10(size)))
    return round(size, digits)


@dataclass
class Tile:
    index: tuple[int, int, int]       # (column x, column y, layer)
    offset: np.ndarray                # int64 [3]: the tile's first voxel in global voxel indices
    grid: np.ndarray                  # [C, X, Y, Z]
    points: int


def tile_scan(points: np.ndarray, colours: np.ndarray | None, voxel_size: float, shape: tuple[int, int, int],
              min_points: int = 1) -> tuple[np.ndarray, list[Tile], int]:
    """Cut a scan into voxel tiles: (origin [3], kept tiles, points in left-out tiles).

    Global voxel indices g = floor((p - origin) / voxel_size) with origin the
    scan's lowest corner; tile columns of shape[0] x shape[1] voxels; each
    column's layers of shape[2] voxels start at its lowest point. A point's
    voxel in its tile is g - tile.offset.
    """
    shape = tuple(int(s) for s in shape)
    origin = points.min(axis=0)
    g = voxel_indices(points, origin, voxel_size)
    column = g[:, :2] // np.array(shape[:2])
    columns, column_id = np.unique(column, axis=0, return_inverse=True)
    column_id = column_id.reshape(-1)
    base = np.full(len(columns), np.iinfo(np.int64).max)
    np.minimum.at(base, column_id, g[:, 2])
    layer = (g[:, 2] - base[column_id]) // shape[2]
    keys = np.stack([column_id, layer], axis=1)
    tile_keys, tile_id = np.unique(keys, axis=0, return_inverse=True)
    tile_id = tile_id.reshape(-1)
    order = np.argsort(tile_id, kind="stable")
    bounds = np.searchsorted(tile_id[order], np.arange(len(tile_keys) + 1))
    tiles, dropped = [], 0
    for t, (cid, lay) in enumerate(tile_keys):
        members = order[bounds[t]:bounds[t + 1]]
        if len(members) < min_points:
            dropped += len(members)
            continue
        offset = np.array([columns[cid][0] * shape[0], columns[cid][1] * shape[1], base[cid] + lay * shape[2]])
        grid = voxelise_indices(g[members] - offset, None if colours is None else colours[members], shape)
        tiles.append(Tile((int(columns[cid][0]), int(columns[cid][1]), int(lay)), offset, grid, len(members)))
    return origin, tiles, dropped


# -- point files ----------------------------------------------------------------------------------

def unit_colours(rgb: np.ndarray) -> np.ndarray:
    """LAS colours are 16-bit, but many files store 8-bit values in them: scale by what the data uses."""
    rgb = np.asarray(rgb, np.float64)
    return rgb / (65535.0 if rgb.max(initial=0) > 255 else 255.0)


def read_points(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A point file -> (xyz float64 [P, 3], rgb in [0, 1] [P, 3] or None when it has no colour)."""
    source, suffix = str(path), path.suffix.lower()
    if suffix in (".las", ".laz"):
        import laspy

        try:
            las = laspy.read(str(path))
        except Exception as error:  # noqa: BLE001  (laspy/lazrs raise many kinds on bad bytes)
            raise BadInput(source, f"laspy cannot read it ({type(error).__name__}: {error})",
                           "unreadable_points") from None
        xyz = np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], axis=1).astype(np.float64)
        names = set(las.point_format.dimension_names)
        rgb = None
        if {"red", "green", "blue"} <= names and len(xyz):
            raw = np.stack([np.asarray(las.red), np.asarray(las.green), np.asarray(las.blue)], axis=1)
            rgb = unit_colours(raw) if raw.any() else None  # all-zero RGB fields carry no colour
    elif suffix in (".ply", ".pcd"):
        import open3d as o3d

        if path.stat().st_size == 0:
            raise BadInput(source, "point file is empty (0 bytes)", "empty_cloud")
        cloud = o3d.io.read_point_cloud(str(path))  # open3d warns and returns an empty cloud on bad files
        xyz = np.asarray(cloud.points, dtype=np.float64)
        if not len(xyz):
            raise BadInput(source, "open3d read no points (empty or unreadable file)", "unreadable_points")
        rgb = np.asarray(cloud.colors, dtype=np.float64) if cloud.has_colors() else None
    else:
        raise BadInput(source, f"not a point file ({', '.join(CLOUD_SUFFIXES)})", "unreadable_points")
    if not len(xyz):
        raise BadInput(source, "the scan holds no points", "empty_cloud")
    if not np.isfinite(xyz).all() or (rgb is not None and not np.isfinite(rgb).all()):
        raise BadInput(source, "the scan holds NaN or infinite coordinates or colours", "nonfinite_points")
    return xyz, rgb


def scan_samples(path: Path, key: str, settings: Voxelisation) -> list[dict]:
    """One scan -> its voxel tiles as samples (RGB + density, or density only)."""
    xyz, rgb = read_points(path)
    if settings.channels == 4 and rgb is None:
        raise BadInput(str(path), "the scan has no colour, but the modality wants RGB + density "
                       "(set modality_options.channels: 1 for density-only grids)", "missing_colour")
    if settings.channels not in (1, 4):
        raise BadInput(str(path), f"point clouds voxelise into 1 (density) or 4 (RGB + density) channels, "
                       f"not {settings.channels}", "missing_colour")
    voxel_size = settings.voxel_size or auto_voxel_size(xyz)
    origin, tiles, dropped = tile_scan(xyz, rgb if settings.channels == 4 else None, voxel_size,
                                       settings.grid_size, settings.min_points)
    samples = []
    for tile in tiles:
        meta = {"source": str(path), "scan_points": len(xyz), "voxel_size": voxel_size,
                "scan_origin": origin.tolist(), "tile": list(tile.index), "voxel_offset": tile.offset.tolist(),
                "tile_origin": (origin + tile.offset * voxel_size).tolist(), "points": tile.points,
                "points_in_left_out_tiles": dropped, "channels": ["red", "green", "blue", "density"]
                if settings.channels == 4 else ["density"]}
        samples.append({"__key__": sample_key(f"{key}_t{tile.index[0]:03d}_{tile.index[1]:03d}_{tile.index[2]}"),
                        "__source__": str(path), "grid.npz": encode_grid(tile.grid),
                        "meta.json": json.dumps(meta)})
    return samples


# -- sources ----------------------------------------------------------------------------------------

def file_samples(path: Path, root: Path, settings: Voxelisation) -> list[dict]:
    key = sample_key(str(path.relative_to(root).with_suffix("")) if path != root else path.stem)
    suffix = path.suffix.lower()
    if suffix in GRID_SUFFIXES:
        return [{"__key__": key, "__source__": str(path), GRID_SUFFIXES[suffix]: path.read_bytes()}]
    return scan_samples(path, key, settings)


def read_path(source: str, settings: Voxelisation) -> SourceSamples:
    root = Path(source)
    wanted = set(GRID_SUFFIXES) | set(CLOUD_SUFFIXES)
    if root.is_file():
        if root.suffix.lower() not in wanted:
            raise BadInput(source, f"is not a grid or point file ({', '.join(sorted(wanted))})", "missing_source")
        return SourceSamples([root], lambda p: file_samples(p, p, settings))
    if not root.is_dir():
        raise BadInput(source, f"is not a folder or file of grids / point clouds (nor a built-in source: "
                       f"{', '.join(BUILTIN_SOURCES)})", "missing_source")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
    if not files:
        raise BadInput(source, f"holds no {'/'.join(sorted(wanted))} files", "missing_source")
    return SourceSamples(files, lambda p: file_samples(p, root, settings))


def mni152_volumes() -> dict[str, np.ndarray]:
    """nilearn's bundled MNI152 2009 templates at 2 mm (99 x 117 x 95), values in [0, 1]."""
    from nilearn import datasets

    loaders = {"t1": datasets.load_mni152_template, "gm": datasets.load_mni152_gm_template,
               "wm": datasets.load_mni152_wm_template}
    return {name: np.clip(np.asarray(loaders[name](resolution=2).get_fdata(), np.float32), 0, None)
            for name in MNI_TEMPLATES}


def crop_offsets(size: int, crop: int) -> list[int]:
    return [0] if size <= crop else [0, size - crop]


def read_mni152(crop: int = MNI_CROP) -> list[dict]:
    """Each template cut into (up to) 8 overlapping crop^3 sub-volumes (corners of the volume)."""
    samples = []
    for name, volume in mni152_volumes().items():
        for ox in crop_offsets(volume.shape[0], crop):
            for oy in crop_offsets(volume.shape[1], crop):
                for oz in crop_offsets(volume.shape[2], crop):
                    grid = volume[ox:ox + crop, oy:oy + crop, oz:oz + crop][None]
                    meta = {"source": f"nilearn MNI152 2009 {name} template, 2 mm", "offset": [ox, oy, oz],
                            "channels": ["density"]}
                    samples.append({"__key__": f"mni152_{name}_{ox:03d}_{oy:03d}_{oz:03d}",
                                    "__source__": f"nilearn:mni152_{name}", "grid.npz": encode_grid(grid),
                                    "meta.json": json.dumps(meta)})
    return samples


# -- the laspy test scans (real data, fetched through pip) -----------------------------------------

def laspy_scans(cache_dir: str | Path | None = None) -> list[Path]:
    try:
        folder = fetch_laspy_test_scans(cache_dir)
    except PackagedDataError as error:
        raise BadInput("laspy-lidar", f"cannot fetch laspy's test scans: {error}", "missing_source") from None
    return [folder / name for name in LASPY_SCANS if (folder / name).is_file()]


def read_laspy_lidar(settings: Voxelisation) -> SourceSamples:
    if settings.channels != 4:
        raise BadInput("laspy-lidar", f"the coloured scans give RGB + density grids (channels: 4), not "
                       f"{settings.channels} channels: set modality_options.channels: 4", "missing_source")
    return SourceSamples(laspy_scans(), lambda p: scan_samples(p, sample_key(p.stem), settings))


def read_source(source: str, settings: Voxelisation | None = None) -> Iterable[dict]:
    settings = settings or Voxelisation()
    if source == "mni152":
        if settings.channels != 1:
            raise BadInput("mni152", f"the brain template gives density grids (channels: 1), not {settings.channels} "
                           "channels: set modality_options.channels: 1 (`polymae shard ... --option channels=1`)",
                           "missing_source")
        return iter(read_mni152())
    if source == "laspy-lidar":
        return read_laspy_lidar(settings)
    return read_path(source, settings)
