"""Modality packages, found through the `polymae.modalities` entry-point group.

Every installed distribution may name modules in that group (polymae's own
are in pyproject.toml; a lab's modality can live in its own pip package with
one entry-point line). Importing this package imports each of them, and a
module registers its modalities in `polymae.shared.registry.MODALITIES` as
it is imported. One whose optional dependencies are missing is skipped here
and reported by `polymae info`, so a core install still works for images.
"""
from __future__ import annotations

import importlib.metadata

ENTRY_POINT_GROUP = "polymae.modalities"
UNAVAILABLE: dict[str, str] = {}
LOADED: dict[str, str] = {}


def load_modalities() -> dict[str, str]:
    """Import every module the entry-point group names (again when new ones appear); {name: module}."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in LOADED or entry.name in UNAVAILABLE:
            continue
        try:
            entry.load()
        except ImportError as err:  # an optional extra is not installed
            UNAVAILABLE[entry.name] = str(err)
            continue
        LOADED[entry.name] = entry.value
    return dict(LOADED)


load_modalities()
