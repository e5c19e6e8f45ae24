"""Point clouds: objects, scenes and LiDAR sweeps (Point-MAE, R-MAE).

Registers the "pointcloud" and "lidar" modalities, the "point_block" and
"radial" maskers and the "chamfer" and "occupancy" objectives.
"""
from .modality import LidarModality, PointCloudModality  # noqa: F401  (registers them)
