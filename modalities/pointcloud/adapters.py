"""Point-cloud dataset adapters: files -> `Cloud`s -> Samples, and Sample bytes -> `Cloud`.

Formats read (from bytes, so the same code reads a file and a shard record):
  .ply / .pcd   through open3d's tensor I/O (colours, intensity and normals kept)
  .las / .laz   through laspy (the lazrs backend decompresses .laz)
  .bin          KITTI-style sweeps: float32 (x, y, z, intensity) per point
  .npy          [N, C] float: xyz, then by C: 4 +intensity, 6 +rgb, 7 +intensity+rgb,
                9 +rgb+normals, 10 +intensity+rgb+normals
  .npz          arrays "xyz" [N, 3] (required), "origin" [3], "rgb" [N, 3] in 0..1,
                "intensity" [N] or [N, 1] in 0..1, "normals" [N, 3]

Shard storage: a sample is `{"__key__", "points.npz", "meta.json"}` (tiles of
any source) or `{"__key__", "lidar.bin", "meta.json"}` (LiDAR-style sweeps).
Coordinates are stored relative to the sample's `origin` (float64, in the
npz and meta.json), so float32 keeps millimetres even for UTM coordinates.

Sources (`read_source`):
  a folder      every point file in it (recursively); a scan with more than
                2 x `tile_points` points is cut into xy tiles (0: keep files whole)
  a file        one scan, tiled by the same rule (big scans give many samples)
  laspy-tiles   REAL airborne and terrestrial scans: the LAS/LAZ test files of
                laspy 2.7.0's source distribution, cut into square xy tiles
  laspy-sweeps  the same airborne scans cut into discs around a pseudo-sensor
                at each disc's centre, stored as KITTI-style lidar.bin (no
                spinning-LiDAR sweep ships in a package; see the README note)
The laspy test files are not in laspy's wheel: `fetch_laspy_test_scans`
downloads the sdist through pip (the package registry) once and caches it.

Every failure raises `BadInput(source, problem, kind)` naming the file; kinds:
unreadable_points, empty_cloud, nan_coordinates, nan_features, too_few_points,
missing_feature, sparse_tile, missing_source.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from polymae.modalities.pointcloud.packaged import LASPY_VERSION, fetch_laspy_test_scans  # noqa: F401
from polymae.shared.errors import BadInput
from polymae.shared.packaged_data import PackagedDataError
from polymae.shared.sources import SourceSamples, sample_key

FEATURE_WIDTHS = {"rgb": 3, "intensity": 1, "normals": 3}
POINT_SUFFIXES = {".ply": "points.ply", ".pcd": "points.pcd", ".las": "points.las", ".laz": "points.laz",
                  ".bin": "lidar.bin", ".npy": "points.npy", ".npz": "points.npz"}
NPY_LAYOUTS = {3: (), 4: ("intensity",), 6: ("rgb",), 7: ("intensity", "rgb"), 9: ("rgb", "normals"),
               10: ("intensity", "rgb", "normals")}
O3D_NAMES = {"rgb": "colors", "intensity": "intensity", "normals": "normals"}
FAR = 1e4  # coordinates beyond this are re-expressed relative to the cloud's minimum corner

# The distinct real scans among laspy's test files (the others repeat these points in
# other LAS versions / point formats, or hold a handful of points).
LASPY_TILE_SCANS = ("autzen_trim.laz", "append-bug.laz", "file_with_both_wkt_and_geotiff_vlrs.las",
                    "simple1_4.las", "vegetation_1_3.las", "plane.laz", "simple.laz", "simple1_3.las",
                    "test1_4.las")
LASPY_SWEEP_SCANS = ("autzen_trim.laz", "append-bug.laz")  # wide airborne scans (~1 km across)
BUILTIN_SOURCES = {
    "laspy-tiles": f"laspy {LASPY_VERSION}'s real LAS/LAZ test scans (Autzen stadium and others), "
                   "cut into xy tiles (fetched once through pip)",
    "laspy-sweeps": f"laspy {LASPY_VERSION}'s airborne test scans cut into discs around a pseudo-sensor, "
                    "stored as KITTI-style lidar.bin",
}


# -- the in-memory cloud -------------------------------------------------------------------------


@dataclass
class Cloud:
    """Points relative to `origin` (absolute position = xyz + origin) and named per-point features."""

    xyz: np.ndarray                                    # float64 [N, 3]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [N, width]
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __len__(self) -> int:
        return len(self.xyz)

    def subset(self, index: np.ndarray) -> "Cloud":
        return Cloud(self.xyz[index], {k: v[index] for k, v in self.features.items()}, self.origin.copy())

    def shifted(self, new_origin: np.ndarray) -> "Cloud":
        """The same points expressed relative to `new_origin`."""
        new_origin = np.asarray(new_origin, dtype=np.float64)
        return Cloud(self.xyz + (self.origin - new_origin), dict(self.features), new_origin)

    def columns(self, names: Iterable[str], source: str = "cloud") -> np.ndarray:
        """float32 [N, 3 + sum(widths)]: xyz then the named features in order."""
        parts = [self.xyz.astype(np.float32)]
        for name in names:
            if name not in self.features:
                have = ", ".join(sorted(self.features)) or "none"
                hint = " or set modality_options.estimate_normals: true" if name == "normals" else ""
                raise BadInput(source, f"has no '{name}' per-point feature (it has: {have}); drop it from "
                               f"modality_options.features{hint}", "missing_feature")
            parts.append(self.features[name].astype(np.float32).reshape(len(self), -1))
        return np.concatenate(parts, axis=1)


def check_cloud(cloud: Cloud, source: str) -> Cloud:
    if len(cloud) == 0:
        raise BadInput(source, "point cloud is empty (0 points)", "empty_cloud")
    bad = ~np.isfinite(cloud.xyz).all(axis=1)
    if bad.any():
        raise BadInput(source, f"{int(bad.sum())} of {len(cloud)} points have NaN or infinite coordinates "
                       "(e.g. a sensor's no-return marker); drop them before sharding", "nan_coordinates")
    for name, values in cloud.features.items():
        if not np.isfinite(values).all():
            raise BadInput(source, f"per-point feature '{name}' holds NaN or infinite values", "nan_features")
    return cloud


def unit_colours(colours: np.ndarray) -> np.ndarray:
    """Colours of any integer or float type -> float32 in 0..1."""
    colours = np.asarray(colours)
    if colours.dtype == np.uint8:
        return colours.astype(np.float32) / 255
    if np.issubdtype(colours.dtype, np.integer):
        top = float(colours.max(initial=0))
        return colours.astype(np.float32) / (65535.0 if top > 255 else 255.0)
    return colours.astype(np.float32)


# -- decoding one file's bytes -------------------------------------------------------------------


# A header promises a count; the bytes after it must be able to hold that many points, checked
# before any reader allocates or parses them (a PLY claiming 100,000 vertices over 20 was read as
# 99,980 points at the origin in 102 s; a LAS header's VLR count over random bytes looped in laspy).
PLY_TYPE_BYTES = {name: size for names, size in (
    (("char", "uchar", "int8", "uint8"), 1), (("short", "ushort", "int16", "uint16"), 2),
    (("int", "uint", "float", "int32", "uint32", "float32"), 4), (("double", "float64"), 8)) for name in names}
PCD_SIZES = {"1", "2", "4", "8"}


def promise_fits(source: str, count: int, what: str, need: int, have: int) -> None:
    if need > have:
        raise BadInput(source, f"header promises {count} {what} ({need} bytes) but only {have} bytes follow it: "
                       "the file is truncated or its header is wrong", "unreadable_points")


def text_rows(body: bytes) -> int:
    return sum(1 for line in body.splitlines() if line.strip())


def ply_vertex_count(data: bytes, source: str) -> int:
    """The vertex count of a PLY header, checked against the bytes after it."""
    if not data.startswith(b"ply"):
        raise BadInput(source, "not a PLY file (no 'ply' magic at the start)", "unreadable_points")
    end = data.find(b"end_header")
    header = data[: end if end >= 0 else 4096].decode("latin-1")
    match = re.search(r"^element\s+vertex\s+(\d+)", header, re.MULTILINE)
    form = re.search(r"^format\s+(\w+)", header, re.MULTILINE)
    if end < 0 or match is None or form is None:
        raise BadInput(source, "PLY header has no format, no 'element vertex' count or no end_header",
                       "unreadable_points")
    count, body = int(match.group(1)), data[data.find(b"\n", end) + 1:]
    if form.group(1) == "ascii":
        promise_fits(source, count, "vertices (one text line each)", count, text_rows(body))
        return count
    # binary: a vertex row is its properties' sizes (a list or an unknown type: at least a byte); what
    # other elements hold only adds to what the file must have, so leaving it out keeps this a lower bound
    vertex_row = 0
    for line in header[match.end():].splitlines()[1:]:
        words = line.split()
        if words[:1] != ["property"]:
            break
        if words[1] == "list" or words[1] not in PLY_TYPE_BYTES:
            vertex_row = max(vertex_row, 1)  # variable or unknown: at least a byte per vertex
            continue
        vertex_row += PLY_TYPE_BYTES[words[1]]
    promise_fits(source, count, "vertices", count * max(vertex_row, 1), len(body))
    return count


def pcd_point_count(data: bytes, source: str) -> int:
    """The point count of a PCD header, checked against the bytes after it."""
    header = data[:4096].decode("latin-1", errors="replace")
    match = re.search(r"^POINTS\s+(\d+)", header, re.MULTILINE)
    form = re.search(r"^DATA\s+(\w+)[^\n]*\n", header, re.MULTILINE)
    if not re.search(r"^(#|VERSION|FIELDS)", header, re.MULTILINE) or match is None or form is None:
        raise BadInput(source, "not a PCD file (no POINTS/DATA header)", "unreadable_points")
    count, body = int(match.group(1)), data[len(header[: form.end()].encode("latin-1")):]
    sizes = re.search(r"^SIZE\s+([^\n]+)", header, re.MULTILINE)
    counts = re.search(r"^COUNT\s+([^\n]+)", header, re.MULTILINE)
    if form.group(1) == "ascii":
        promise_fits(source, count, "points (one text line each)", count, text_rows(body))
    elif form.group(1) == "binary" and sizes and set(sizes.group(1).split()) <= PCD_SIZES:
        widths = [int(c) for c in counts.group(1).split()] if counts else [1] * len(sizes.group(1).split())
        row = sum(int(size) * width for size, width in zip(sizes.group(1).split(), widths))
        promise_fits(source, count, "points", count * row, len(body))
    elif form.group(1) == "binary_compressed":  # two uint32 sizes, then the compressed bytes
        packed = int.from_bytes(body[:4], "little") if len(body) >= 8 else None
        if packed is None or packed > len(body) - 8:
            raise BadInput(source, f"compressed PCD data is cut short ({len(body)} bytes after the header)",
                           "unreadable_points")
    return count


def check_las_header(data: bytes, source: str) -> None:
    """A LAS/LAZ header's sizes against the file: laspy trusts them (reading 1.7 billion empty VLRs
    from 400 random bytes). Offsets and counts of the public header block, LAS 1.0-1.4."""
    if not data.startswith(b"LASF"):
        raise BadInput(source, "not a LAS file (no 'LASF' signature at the start)", "unreadable_points")
    if len(data) < 227:
        raise BadInput(source, f"{len(data)} bytes cannot hold a LAS header (227 bytes)", "unreadable_points")
    header_size, point_offset, vlrs = (int.from_bytes(data[a:b], "little") for a, b in ((94, 96), (96, 100),
                                                                                       (100, 104)))
    point_format, record_length = data[104], int.from_bytes(data[105:107], "little")
    count = int.from_bytes(data[107:111], "little")
    if header_size >= 375 and data[24:26] >= bytes([1, 4]):
        count = max(count, int.from_bytes(data[247:255], "little"))
    if not 227 <= header_size <= point_offset <= len(data):
        raise BadInput(source, f"LAS header size {header_size} and point data offset {point_offset} do not fit "
                       f"a {len(data)}-byte file", "unreadable_points")
    promise_fits(source, vlrs, "variable-length records (54 bytes each at least)", vlrs * 54,
                 point_offset - header_size)
    if not point_format & 0xC0:  # uncompressed: every record has its full length
        promise_fits(source, count, f"points of {record_length} bytes", count * record_length,
                     len(data) - point_offset)


def read_open3d(data: bytes, suffix: str, source: str) -> Cloud:
    """PLY or PCD bytes -> Cloud through open3d's tensor I/O (which reads from a path)."""
    expected = ply_vertex_count(data, source) if suffix == ".ply" else pcd_point_count(data, source)
    if expected == 0:
        raise BadInput(source, "point cloud is empty (0 points)", "empty_cloud")
    import open3d as o3d

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    with tempfile.TemporaryDirectory(prefix="polymae-points-") as folder:
        path = os.path.join(folder, f"cloud{suffix}")
        with open(path, "wb") as handle:
            handle.write(data)
        cloud = o3d.t.io.read_point_cloud(path)
    if "positions" not in cloud.point or cloud.point.positions.shape[0] == 0:
        raise BadInput(source, f"open3d could not read the points (header promises {expected})",
                       "unreadable_points")
    xyz = cloud.point.positions.numpy().astype(np.float64)
    features = {}
    for name, key in O3D_NAMES.items():
        if key in cloud.point:
            values = cloud.point[key].numpy()
            features[name] = unit_colours(values) if name == "rgb" else values.astype(np.float32).reshape(len(xyz), -1)
    return Cloud(xyz, features)


def read_las(data: bytes, source: str) -> Cloud:
    import laspy

    check_las_header(data, source)
    try:
        # lazrs decompresses .laz (single-threaded: data workers already run in parallel)
        las = laspy.read(io.BytesIO(data), laz_backend=laspy.LazBackend.Lazrs)
        xyz = np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], axis=1).astype(np.float64)
    except Exception as error:  # noqa: BLE001  (laspy/lazrs raise many kinds on bad bytes)
        raise BadInput(source, f"laspy cannot read it ({type(error).__name__}: {error})", "unreadable_points") \
            from None
    if len(xyz) == 0:
        raise BadInput(source, "point cloud is empty (0 points)", "empty_cloud")
    origin = np.floor(xyz.min(axis=0))
    names = set(las.point_format.dimension_names)
    features = {}
    if "intensity" in names:
        intensity = np.asarray(las.intensity).astype(np.float32)
        features["intensity"] = (intensity / max(float(intensity.max()), 1.0))[:, None]
    if {"red", "green", "blue"} <= names:
        features["rgb"] = unit_colours(np.stack([np.asarray(las.red), np.asarray(las.green),
                                                 np.asarray(las.blue)], axis=1))
    return Cloud(xyz - origin, features, origin)


def read_kitti_bin(data: bytes, source: str) -> Cloud:
    if len(data) % 16:
        raise BadInput(source, f"{len(data)} bytes is not a whole number of KITTI points "
                       "(4 float32 each: x, y, z, intensity)", "unreadable_points")
    points = np.frombuffer(data, dtype=np.float32).reshape(-1, 4)
    return Cloud(points[:, :3].astype(np.float64), {"intensity": points[:, 3:4].copy()})


def cloud_from_columns(array: np.ndarray, source: str) -> Cloud:
    if array.ndim != 2 or array.shape[1] not in NPY_LAYOUTS:
        raise BadInput(source, f"array of shape {array.shape} is not [N, C] with C in "
                       f"{sorted(NPY_LAYOUTS)} (xyz, then intensity / rgb / normals)", "unreadable_points")
    array = numeric(array, source).astype(np.float64)
    features, column = {}, 3
    for name in NPY_LAYOUTS[array.shape[1]]:
        width = FEATURE_WIDTHS[name]
        features[name] = array[:, column:column + width].astype(np.float32)
        column += width
    return Cloud(array[:, :3], features)


def read_numpy(data: bytes, suffix: str, source: str) -> Cloud:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # noqa: BLE001
        raise BadInput(source, f"numpy cannot read it ({type(error).__name__}: {error})", "unreadable_points") \
            from None
    if suffix == ".npy":
        if not isinstance(loaded, np.ndarray):
            raise BadInput(source, "a .npy file must hold one array", "unreadable_points")
        return cloud_from_columns(loaded, source)
    with loaded:
        return cloud_from_npz(loaded, source)


def cloud_from_npz(loaded, source: str) -> Cloud:
    if "xyz" not in loaded.files:
        if "points" in loaded.files:
            return cloud_from_columns(loaded["points"], source)
        raise BadInput(source, f"npz has no 'xyz' array (it has {loaded.files})", "unreadable_points")
    xyz = numeric(loaded["xyz"], source, "npz 'xyz'").astype(np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise BadInput(source, f"npz 'xyz' has shape {xyz.shape}, not [N, 3]", "unreadable_points")
    features = {}
    for name, width in FEATURE_WIDTHS.items():
        if name in loaded.files:
            values = numeric(loaded[name], source, f"npz '{name}'")
            if values.size != len(xyz) * width:
                raise BadInput(source, f"npz '{name}' has shape {values.shape}, not [{len(xyz)}, {width}]",
                               "unreadable_points")
            values = values.reshape(len(xyz), width)
            features[name] = unit_colours(values) if name == "rgb" else values.astype(np.float32)
    origin = numeric(loaded["origin"], source, "npz 'origin'").astype(np.float64) if "origin" in loaded.files \
        else np.zeros(3)
    return Cloud(xyz, features, origin)


def numeric(array, source: str, what: str = "array") -> np.ndarray:
    """`array` when it holds numbers (ints, floats, bools); strings, objects, dates or records are
    no coordinates, however many columns they have."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise BadInput(source, f"{what} holds {array.dtype} values ({array.dtype.kind!r} kind), not numbers",
                       "unreadable_points")
    return array


def decode_points(data: bytes, kind: str, source: str) -> Cloud:
    """Bytes of a point file -> a checked Cloud. `kind` is a suffix (".laz") or a
    sample key ("points.laz", "lidar.bin"); `source` names the file in errors."""
    suffix = "." + kind.rsplit(".", 1)[-1].lower()
    if not data:
        raise BadInput(source, "file is empty (0 bytes)", "empty_cloud")
    if suffix in (".ply", ".pcd"):
        cloud = read_open3d(data, suffix, source)
    elif suffix in (".las", ".laz"):
        cloud = read_las(data, source)
    elif suffix == ".bin":
        cloud = read_kitti_bin(data, source)
    elif suffix in (".npy", ".npz"):
        cloud = read_numpy(data, suffix, source)
    else:
        raise BadInput(source, f"unknown point-file type {suffix!r}; one of {', '.join(POINT_SUFFIXES)}",
                       "unreadable_points")
    cloud = check_cloud(cloud, source)
    if np.abs(cloud.xyz).max() > FAR:  # e.g. UTM coordinates in a PLY: keep float32 storage exact to ~1 mm
        cloud = cloud.shifted(cloud.origin + np.floor(cloud.xyz.min(axis=0)))
    return cloud


# -- encoding --------------------------------------------------------------------------------------


def encode_npz(cloud: Cloud) -> bytes:
    arrays = {"xyz": cloud.xyz.astype(np.float32), "origin": cloud.origin.astype(np.float64)}
    arrays.update({name: values.astype(np.float32) for name, values in cloud.features.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def encode_kitti_bin(cloud: Cloud) -> bytes:
    intensity = cloud.features.get("intensity", np.zeros((len(cloud), 1), np.float32))
    return np.concatenate([cloud.xyz.astype(np.float32), intensity.reshape(-1, 1).astype(np.float32)], 1).tobytes()


def write_open3d(cloud: Cloud, path: str | Path) -> None:
    """Write a Cloud as .ply or .pcd (by suffix) with its colours, intensity and normals."""
    import open3d as o3d

    tensor = o3d.t.geometry.PointCloud()
    tensor.point.positions = o3d.core.Tensor((cloud.xyz + cloud.origin).astype(np.float64))
    for name, values in cloud.features.items():
        tensor.point[O3D_NAMES[name]] = o3d.core.Tensor(values.astype(np.float32).reshape(len(cloud), -1))
    if not o3d.t.io.write_point_cloud(str(path), tensor):
        raise OSError(f"open3d could not write {path}")


# -- open3d preprocessing --------------------------------------------------------------------------


def preprocess(cloud: Cloud, voxel_size: float | None = None, outlier_neighbors: int = 0,
               outlier_std: float = 2.0, estimate_normals: bool = False, normal_neighbors: int = 16) -> Cloud:
    """Voxel down-sampling (features averaged per voxel), statistical outlier removal
    and normal estimation, all through open3d's tensor point cloud."""
    if not voxel_size and not outlier_neighbors and not estimate_normals:
        return cloud
    import open3d as o3d

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    tensor = o3d.t.geometry.PointCloud()
    tensor.point.positions = o3d.core.Tensor(cloud.xyz.astype(np.float64))
    for name, values in cloud.features.items():
        tensor.point[O3D_NAMES[name]] = o3d.core.Tensor(values.astype(np.float32).reshape(len(cloud), -1))
    if voxel_size:
        tensor = tensor.voxel_down_sample(float(voxel_size))
    if outlier_neighbors and tensor.point.positions.shape[0] > outlier_neighbors:
        tensor, _ = tensor.remove_statistical_outliers(int(outlier_neighbors), float(outlier_std))
    if estimate_normals and tensor.point.positions.shape[0] >= 3:
        tensor.estimate_normals(max_nn=int(normal_neighbors))
    xyz = tensor.point.positions.numpy().astype(np.float64)
    features = {name: tensor.point[key].numpy().astype(np.float32).reshape(len(xyz), -1)
                for name, key in O3D_NAMES.items() if key in tensor.point}
    return Cloud(xyz, features, cloud.origin.copy())


# -- tiling big scans ------------------------------------------------------------------------------


def auto_tile_size(cloud: Cloud, tile_points: int, rounds: int = 4) -> float:
    """The xy tile side whose occupied tiles hold about `tile_points` points (median).

    Starts from the scan's mean density over its bounding box, then corrects
    by the median count of the occupied cells (airborne scans leave much of
    their box empty, so the box density alone makes tiles too big)."""
    xy = cloud.xyz[:, :2]
    extent = np.ptp(xy, axis=0)
    area = max(float(extent[0]) * float(extent[1]), 1e-12)
    size = max(math.sqrt(area * tile_points / len(cloud)), 1e-6)
    for _ in range(rounds):
        cells = np.floor((xy - xy.min(axis=0)) / size).astype(np.int64)
        _, counts = np.unique(cells, axis=0, return_counts=True)
        size *= math.sqrt(tile_points / max(float(np.median(counts)), 1.0))
    return size


def tile_cloud(cloud: Cloud, tile_size: float, shape: str = "square",
               split_above: int | None = None) -> Iterator[tuple[str, Cloud, float]]:
    """Cut a scan into xy cells of side `tile_size` ("square"), or discs of diameter
    `tile_size` inscribed in those cells ("disc": a pseudo-sensor at each centre).

    A cell holding more than `split_above` points is split into quadrants,
    recursively (airborne scans are far denser in some places than others).
    Yields (label, piece, side); each piece is expressed relative to its own
    origin: a square tile's minimum corner at its lowest point's height, a
    disc's centre at the median height of its points.
    """
    if shape not in ("square", "disc"):
        raise ValueError(f"tile shape must be square or disc, got {shape!r}")
    low = cloud.xyz[:, :2].min(axis=0)
    cell = np.floor((cloud.xyz[:, :2] - low) / tile_size).astype(np.int64)
    order = np.lexsort((cell[:, 1], cell[:, 0]))
    cells, starts = np.unique(cell[order], axis=0, return_index=True)
    ends = np.append(starts[1:], len(order))
    for (ix, iy), start, end in zip(cells, starts, ends):
        yield from cell_pieces(cloud, np.sort(order[start:end]), low + np.array([ix, iy]) * tile_size, tile_size,
                               f"{ix:03d}_{iy:03d}", shape, split_above, depth=0)


def cell_pieces(cloud: Cloud, index: np.ndarray, corner: np.ndarray, size: float, label: str, shape: str,
                split_above: int | None, depth: int) -> Iterator[tuple[str, Cloud, float]]:
    if split_above and len(index) > split_above and depth < 8:
        half = size / 2
        quadrant = np.clip(np.floor((cloud.xyz[index, :2] - corner) / half).astype(np.int64), 0, 1)
        for qy in (0, 1):
            for qx in (0, 1):
                sub = index[(quadrant[:, 0] == qx) & (quadrant[:, 1] == qy)]
                if len(sub):
                    yield from cell_pieces(cloud, sub, corner + half * np.array([qx, qy]), half,
                                           f"{label}q{qx + 2 * qy}", shape, split_above, depth + 1)
        return
    if shape == "disc":
        centre = corner + size / 2
        index = index[np.linalg.norm(cloud.xyz[index, :2] - centre, axis=1) <= size / 2]
        if len(index) == 0:
            return
        piece = cloud.subset(index)
        local_origin = np.array([centre[0], centre[1], float(np.median(piece.xyz[:, 2]))])
    else:
        piece = cloud.subset(index)
        local_origin = np.array([corner[0], corner[1], float(piece.xyz[:, 2].min())])
    yield label, piece.shifted(cloud.origin + local_origin), size


# -- samples -------------------------------------------------------------------------------------


def make_sample(key: str, source: str, cloud: Cloud, storage: str = "points.npz", **meta) -> dict:
    payload = encode_kitti_bin(cloud) if storage == "lidar.bin" else encode_npz(cloud)
    info = {"source": source, "points": len(cloud), "origin": [float(v) for v in cloud.origin],
            "features": sorted(cloud.features), **meta}
    return {"__key__": key, "__source__": source, storage: payload, "meta.json": json.dumps(info).encode()}


@dataclass
class TileSettings:
    tile_points: int = 2048        # about this many points per tile; 0: never tile a folder's files
    tile_size: float | None = None  # tile side in the scan's units; None: from tile_points and density
    min_tile_points: int = 256     # smaller tiles (scan edges) are reported as sparse_tile, not written
    shape: str = "square"          # square tiles, or discs around a pseudo-sensor
    storage: str = "points.npz"    # points.npz, or lidar.bin (KITTI-style x, y, z, intensity)


def scan_samples(path: Path, key: str, settings: TileSettings) -> list:
    """One file -> its samples (one, or one per tile); a too-sparse tile is a BadInput
    in the list, which `SourceSamples` raises so the shard writer counts it."""
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(source, f"cannot read file ({error})", "unreadable_points") from None
    cloud = decode_points(data, path.suffix, source)
    if settings.tile_points <= 0 or len(cloud) <= 2 * settings.tile_points:
        return [make_sample(key, source, cloud, settings.storage)]
    size = settings.tile_size or auto_tile_size(cloud, settings.tile_points)
    split_above = None if settings.tile_size else 4 * settings.tile_points
    out: list = []
    tag = "s" if settings.shape == "disc" else "t"
    for label, piece, side in tile_cloud(cloud, size, settings.shape, split_above):
        name = f"{source}#{settings.shape}{label}"
        if len(piece) < settings.min_tile_points:
            out.append(BadInput(name, f"tile has {len(piece)} points, fewer than min_tile_points="
                                f"{settings.min_tile_points} (a scan edge)", "sparse_tile"))
            continue
        out.append(make_sample(f"{key}_{tag}{label}", name, piece, settings.storage, tile=label, tile_size=side,
                               tile_shape=settings.shape))
    return out


def read_folder(root: Path, settings: TileSettings) -> SourceSamples:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in POINT_SUFFIXES)
    if not files:
        raise BadInput(str(root), f"holds no {'/'.join(sorted(POINT_SUFFIXES))} files", "missing_source")
    keyed = [(p, sample_key(str(p.relative_to(root).with_suffix("")))) for p in files]
    return SourceSamples(keyed, lambda item: scan_samples(*item, settings))


def read_file(path: Path, settings: TileSettings) -> SourceSamples:
    return SourceSamples([(path, sample_key(path.stem))], lambda item: scan_samples(*item, settings))


# -- the laspy test scans (real data, fetched through pip) ----------------------------------------------


def laspy_scan_paths(names: Iterable[str], cache_dir: str | Path | None = None) -> list[Path]:
    try:
        folder = fetch_laspy_test_scans(cache_dir)
    except PackagedDataError as error:
        raise BadInput("laspy-tiles", f"cannot fetch laspy's test scans: {error}", "missing_source") from None
    return [folder / name for name in names if (folder / name).is_file()]


def read_builtin(source: str, settings: TileSettings) -> SourceSamples:
    if source == "laspy-tiles":
        paths = laspy_scan_paths(LASPY_TILE_SCANS)
        settings = TileSettings(**{**settings.__dict__, "shape": "square", "storage": "points.npz"})
    else:
        paths = laspy_scan_paths(LASPY_SWEEP_SCANS)
        settings = TileSettings(**{**settings.__dict__, "shape": "disc", "storage": "lidar.bin"})
    keyed = [(p, sample_key(p.stem)) for p in paths]
    return SourceSamples(keyed, lambda item: scan_samples(*item, settings))


def read_source(source: str, settings: TileSettings | None = None) -> SourceSamples:
    """A built-in source, a folder of point files, or one point file (tiled)."""
    settings = settings or TileSettings()
    if source in BUILTIN_SOURCES:
        return read_builtin(source, settings)
    path = Path(source)
    if path.is_dir():
        return read_folder(path, settings)
    if path.is_file():
        if path.suffix.lower() not in POINT_SUFFIXES:
            raise BadInput(source, f"is not a point file ({', '.join(POINT_SUFFIXES)})", "missing_source")
        return read_file(path, settings)
    raise BadInput(source, "is not a folder or point file (nor a built-in source: "
                   f"{', '.join(BUILTIN_SOURCES)})", "missing_source")
