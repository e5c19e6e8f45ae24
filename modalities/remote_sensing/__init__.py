"""Multispectral and SAR remote sensing through rasterio: GeoTIFF / JP2 / netCDF scenes and per-band
files cut into chips, per-band normalisation from the train manifest, land-use labels from vector
polygons, channel or SatMAE band-group tokens."""
from .modality import RemoteSensingModality  # noqa: F401  (registers "remote_sensing")
