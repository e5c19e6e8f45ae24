"""Voxel grids: NeRF-MAE radiance/density grids, FastDiT-3D voxel-aware masking,
SparK sparse encoder; real data from nilearn's MNI152 template and laspy's LiDAR scans."""
from .modality import VoxelModality  # noqa: F401  (registers "voxel", "voxel_aware", "radiance")
