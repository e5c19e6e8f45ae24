"""Modality packages. Importing this registers every modality that is installed.

A modality whose optional dependencies are missing is skipped here and
reported by `polymae info`, so a core install still works for images.
"""
from __future__ import annotations

import importlib

UNAVAILABLE: dict[str, str] = {}

for _name in ("image", "pointcloud", "voxel"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ImportError as err:  # an optional extra is not installed
        UNAVAILABLE[_name] = str(err)
