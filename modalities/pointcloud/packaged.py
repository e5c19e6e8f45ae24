"""laspy's real LAS/LAZ test scans, fetched from its source distribution on PyPI.

laspy's sdist carries real airborne LiDAR scans (LAS and LAZ, some coloured)
in tests/data; its wheel does not. The point-cloud and voxel modalities (and
`make test`'s set-up, ahead of time) read them through this one fetcher.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from polymae.shared.packaged_data import PackagedDataError, fetch_sdist_files  # noqa: F401  (re-exported)

LASPY_VERSION = "2.7.0"


def _scan_file(member: str) -> str | None:
    """tests/data/NAME.las|.laz -> NAME.las|.laz (flat); every other member is left out."""
    path = PurePosixPath(member)
    if path.parent == PurePosixPath("tests/data") and path.suffix.lower() in (".las", ".laz"):
        return path.name
    return None


def fetch_laspy_test_scans(cache_dir: str | Path | None = None, timeout: float = 900) -> Path:
    """The folder of laspy 2.7.0's tests/data LAS/LAZ files, downloaded once
    (`pip download --no-binary laspy --no-deps laspy==2.7.0`) and cached under
    `cache_dir` (default $POLYMAE_CACHE or ~/.cache/polymae). Raises PackagedDataError
    with pip's message when the download fails."""
    return fetch_sdist_files("laspy", LASPY_VERSION, _scan_file, name=f"laspy-{LASPY_VERSION}-tests-data",
                             cache_dir=cache_dir, timeout=timeout)
