"""Real data that packages ship but do not install: fetched through pip, cached.

laspy's source distribution carries real airborne LiDAR scans (LAS and LAZ,
some coloured) in tests/data; its wheel does not. The package registry is
the one network source polymae may use at run time, so `pip download` of
the sdist is how the point-cloud and voxel modalities (and `make test`'s
set-up, ahead of time) get them. One cache serves every modality.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LASPY_VERSION = "2.7.0"


class ScanFetchError(RuntimeError):
    """pip could not fetch laspy's source distribution (offline, no index)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("POLYMAE_CACHE") or Path.home() / ".cache" / "polymae")


def fetch_laspy_test_scans(cache_dir: str | Path | None = None, timeout: float = 900) -> Path:
    """The folder of laspy 2.7.0's tests/data LAS/LAZ files, downloaded once.

    They ship only in laspy's source distribution, so this runs
    `pip download --no-binary :all: --no-deps laspy==2.7.0` (the package
    registry is the one network source), unpacks the test files and caches
    them under `cache_dir` (default $POLYMAE_CACHE or ~/.cache/polymae).
    Raises ScanFetchError with pip's message when the download fails.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"laspy-{LASPY_VERSION}-tests-data"
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".laspy-fetch-", dir=root) as work:
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                   "--disable-pip-version-check", "-q", f"laspy=={LASPY_VERSION}", "-d", work]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ScanFetchError(f"`{' '.join(command[2:])}` did not run: {error}") from None
        sdists = sorted(Path(work).glob(f"laspy-{LASPY_VERSION}.tar.gz"))
        if result.returncode or not sdists:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ScanFetchError(f"`pip download laspy=={LASPY_VERSION}` (sdist) failed: {' | '.join(tail)}")
        staging = Path(work) / "data"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == 4 and parts[1:3] == ("tests", "data") \
                        and Path(parts[3]).suffix.lower() in (".las", ".laz"):
                    (staging / parts[3]).write_bytes(tar.extractfile(member).read())
        if not any(staging.iterdir()):
            raise ScanFetchError(f"laspy {LASPY_VERSION}'s sdist holds no tests/data/*.las files")
        (staging / ".complete").write_text(sdists[0].name + "\n")
        try:
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except OSError:
            if not (target / ".complete").is_file():  # not another process finishing first
                raise
    return target
