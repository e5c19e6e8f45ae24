"""Writing WebDataset shards, and finding them again.

Training reads data as a stream of tar shards (pipelines/stream.py), so a
source is converted once: `shard_source` reads a modality's adapter,
validates every sample by decoding it (a corrupt file is rejected here, once,
not skipped again in every epoch), splits train/val deterministically and
writes size-bounded shards with `write_shards`.

Guarantees:
  - Nothing is dropped silently: a sample the validator refuses, or one the
    source fails to read, is listed under "rejected" in the split's manifest
    with its key, source and reason; `total == inputs - len(rejected)`.
  - Shards are plain tars (`tar tf` lists them) named `{prefix}-{i:06d}.tar`,
    each written under a temporary name and renamed when complete, so a
    crash never leaves a half-written shard under a real name. The manifest
    `{prefix}-manifest.json` is written last, the same way, and lists the
    shards with their record counts and sizes.
  - Each shard says how many records it holds, so a reader counts what damage
    took even where no manifest is at hand (a shard copied alone, a URL): its
    first member, `__shard__` (no extension, so WebDataset's readers and
    older polymae pass over it as metadata), is `{"records": N}` padded to a
    fixed width, written as a placeholder when the shard opens and filled in
    when it closes. A header first, not a trailer last: damage that takes a
    shard's tail (a cut, a zeroed end at a member boundary, which reads as a
    clean end of archive) takes a trailer with it, and a missing trailer
    cannot be told from a tar that never had one.
  - The same input gives byte-identical shards (fixed member mtime), so
    re-sharding is reproducible.

`resolve_shards` turns what a user writes (a folder, a glob, a brace
pattern, a list, URLs or `pipe:` commands) into the list of shards to read.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import braceexpand
from webdataset import TarWriter

from polymae.shared.errors import BadInput, ConfigError, failed, writing
from polymae.shared.modality import Modality
from polymae.shared.sources import DEFAULT_RECORD_SECONDS, RecordTooSlow, name_bytes, time_budget

DEFAULT_MAX_BYTES = 64 * 1024 ** 2
DEFAULT_MAX_COUNT = 10_000
GLOB_CHARACTERS = re.compile(r"[*?\[]")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^pipe:")
SHARD_HEADER = "__shard__"  # a shard's first member: how many records it holds (see the module docstring)
HEADER_DATA_OFFSET = 512  # its data follows its one 512-byte tar header (a short ASCII name needs no extension)


def stable_hash(*parts) -> int:
    """A 64-bit hash of `parts` that is the same in every process and run
    (Python's `hash` of a str is salted per process, so it cannot be used). Any key hashes,
    one whose name is not valid UTF-8 included (`name_bytes`); valid text hashes as it always did."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(name_bytes(text), digest_size=8).digest(), "little")


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def manifest_name(prefix: str) -> str:
    return f"{prefix}-manifest.json"


def shard_header(count: int) -> bytes:
    """The `__shard__` member's data: `{"records": count}`, padded with spaces (JSON allows them) to
    one width for every count, so the count known at a shard's close can overwrite the placeholder."""
    return json.dumps({"records": count}).encode().ljust(40)


def header_count(data: bytes) -> int | None:
    """The record count a `__shard__` member states, or None when its data is not one (damaged)."""
    try:
        count = json.loads(data)["records"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        temporary.write_text(text)
    os.replace(temporary, path)


def record_members(sample: dict) -> dict[str, bytes]:
    """The files a sample becomes in the tar: every key but the `__`-prefixed
    bookkeeping ones (`__key__` names the files; `__source__` is only for messages)."""
    members = {}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"sample {sample.get('__key__')!r}: field {name!r} is {type(value).__name__}; "
                            "adapters must give bytes (or str) for every field")
        members[name] = bytes(value)
    return members


def check_key(sample: dict, previous_key: str | None) -> str:
    """A key the reader can group by: WebDataset splits a member name at the first
    '.' of its base name, and merges consecutive members with the same key."""
    key = sample.get("__key__")
    source = sample.get("__source__", key or "?")
    if not isinstance(key, str) or not key:
        raise BadInput(str(source), f"sample has no usable __key__ ({key!r})", "bad_key")
    if "." in key.rsplit("/", 1)[-1]:
        raise BadInput(str(source), f"key {key!r} contains '.', which would split the record when read "
                       "back; replace it (e.g. with '_') in the adapter", "bad_key")
    if key == previous_key:
        raise BadInput(str(source), f"key {key!r} repeats the previous record's key; the reader would "
                       "merge the two records", "duplicate_key")
    return key


class ShardSetWriter:
    """Writes one split (`prefix`) of size-bounded shards, then its manifest.

    A shard is closed before a sample that would take it past `max_count`
    records or `max_bytes` of payload; a single sample larger than
    `max_bytes` gets a shard of its own.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "train", max_bytes: int = DEFAULT_MAX_BYTES,
                 max_count: int = DEFAULT_MAX_COUNT, modality: str | None = None):
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"max_count ({max_count}) and max_bytes ({max_bytes}) must be positive")
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.max_bytes, self.max_count, self.modality = max_bytes, max_count, modality
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.rejected: list[dict] = []
        self.inputs = 0
        self.tar: TarWriter | None = None
        self.temporary: Path | None = None
        self.shard_count = self.shard_bytes = 0
        self.previous_key: str | None = None

    # -- records ---------------------------------------------------------------
    def add(self, sample: dict, validate: Callable[[dict], object] | None = None,
            seconds: float | None = DEFAULT_RECORD_SECONDS) -> bool:
        """Write `sample`, or reject it when its key or `validate(sample)` raises BadInput (or a
        decoding library's own exception, or runs past its time budget of `seconds`)."""
        self.inputs += 1
        try:
            key = check_key(sample, self.previous_key)
            if validate is not None:
                validated(sample, validate, seconds)
        except BadInput as error:
            self.rejected.append({"key": sample.get("__key__"), "source": sample.get("__source__", error.source),
                                  "kind": error.kind, "reason": error.problem})
            return False
        members = record_members(sample)
        size = sum(len(data) for data in members.values())
        if self.tar is not None and (self.shard_count >= self.max_count
                                     or self.shard_bytes + size > self.max_bytes):
            with writing(self.out_dir / shard_name(self.prefix, len(self.shards))):
                self.finish_shard()
        with writing(self.out_dir / shard_name(self.prefix, len(self.shards)),
                     lambda: f"{len(self.shards)} complete shards are kept; the manifest is not written"):
            if self.tar is None:
                self.start_shard()
            self.tar.write({"__key__": key, **members})
        self.shard_count += 1
        self.shard_bytes += size
        self.previous_key = key
        return True

    def reject_unreadable(self, error: BadInput) -> None:
        """A sample the source itself failed to produce (it raised instead of yielding)."""
        self.inputs += 1
        self.rejected.append({"key": None, "source": error.source, "kind": error.kind, "reason": error.problem})

    # -- shards ----------------------------------------------------------------
    def start_shard(self) -> None:
        name = shard_name(self.prefix, len(self.shards))
        self.temporary = self.out_dir / f".{name}.tmp-{os.getpid()}"
        # PAX allows long member names; a fixed mtime makes shards reproducible.
        self.tar = TarWriter(str(self.temporary), encoder=False, compress=False, mtime=0, format="PAX_FORMAT")
        placeholder = shard_header(0)
        member = tarfile.TarInfo(SHARD_HEADER)
        member.size, member.mtime, member.mode = len(placeholder), 0, self.tar.mode
        member.uname, member.gname = self.tar.user, self.tar.group
        self.tar.tarstream.addfile(member, io.BytesIO(placeholder))
        self.shard_count = self.shard_bytes = 0

    def finish_shard(self) -> None:
        self.tar.close()
        with open(self.temporary, "r+b") as handle:  # the header's count, in place (the tar's checksums cover headers only)
            handle.seek(HEADER_DATA_OFFSET)
            assert handle.read(len(shard_header(0))) == shard_header(0), "the shard header is not where it was written"
            handle.seek(HEADER_DATA_OFFSET)
            handle.write(shard_header(self.shard_count))
        final = self.out_dir / shard_name(self.prefix, len(self.shards))
        os.replace(self.temporary, final)
        self.shards.append({"name": final.name, "count": self.shard_count, "bytes": final.stat().st_size})
        self.tar = self.temporary = None

    def remove_stale_shards(self) -> None:
        """Shards of this prefix left by an earlier, larger run in the same folder:
        a glob over the folder would otherwise mix them into the data."""
        written = {shard["name"] for shard in self.shards}
        for path in self.out_dir.glob(f"{self.prefix}-*.tar"):
            if re.fullmatch(rf"{re.escape(self.prefix)}-\d{{6}}\.tar", path.name) and path.name not in written:
                path.unlink()

    def close(self, extra: dict | None = None) -> dict:
        """Finish the last shard and write the manifest (with `extra` entries); returns the manifest."""
        if self.tar is not None:
            with writing(self.out_dir / shard_name(self.prefix, len(self.shards))):
                self.finish_shard()
        self.remove_stale_shards()
        manifest = {"shards": self.shards, "total": sum(shard["count"] for shard in self.shards),
                    "inputs": self.inputs, "rejected": self.rejected, "modality": self.modality, **(extra or {})}
        assert manifest["total"] == self.inputs - len(self.rejected), "shard writer lost a record"
        write_atomically(self.out_dir / manifest_name(self.prefix), json.dumps(manifest, indent=1))
        return manifest

    def abort(self) -> None:
        """Remove the shard being written (finished shards stay: they are complete)."""
        if self.tar is not None:
            try:
                self.tar.close()
            except OSError:  # a full disk: the half-written shard goes either way
                pass
            self.temporary.unlink(missing_ok=True)
            self.tar = self.temporary = None


def validated(sample: dict, validate: Callable[[dict], object], seconds: float | None) -> None:
    """`validate(sample)` within its time budget; any failure as the BadInput naming the sample."""
    source = str(sample.get("__source__", sample.get("__key__")))
    try:
        with time_budget(seconds):
            validate(sample)
    except BadInput:
        raise
    except RecordTooSlow as error:
        raise BadInput(source, str(error), "too_slow") from None
    except Exception as error:  # noqa: BLE001  (a decoding library's own exception on odd bytes)
        raise failed(source, "decoding it failed", error, "decode_error") from None


def samples_recording_errors(samples: Iterable[dict], on_error: Callable[[BadInput], None],
                             seconds: float | None = DEFAULT_RECORD_SECONDS) -> Iterator[dict]:
    """Iterate `samples`, each within a time budget of `seconds`, handing a BadInput raised while
    producing one to `on_error` and going on (an iterator that can go on after raising does, as
    SourceSamples; a generator ends, and the error says so)."""
    iterator, previous = iter(samples), None
    while True:
        try:
            with time_budget(seconds):
                sample = next(iterator)
        except StopIteration:
            return
        except BadInput as error:
            on_error(error)
            continue
        except RecordTooSlow as error:  # a plain generator is closed by it: nothing more will come
            on_error(BadInput(f"the input after {previous!r}", f"{error}; the source cannot go on after it",
                              "too_slow"))
            continue
        previous = sample.get("__key__")
        yield sample


def write_shards(samples: Iterable[dict], out_dir: str | Path, prefix: str = "train",
                 max_bytes: int = DEFAULT_MAX_BYTES, max_count: int = DEFAULT_MAX_COUNT,
                 validate: Callable[[dict], object] | None = None, modality: str | None = None,
                 record_seconds: float | None = DEFAULT_RECORD_SECONDS) -> dict:
    """Write `samples` as `out_dir/{prefix}-{i:06d}.tar` plus `{prefix}-manifest.json`; returns the manifest.

    `validate(sample)` may raise BadInput to reject a sample (listed in the
    manifest's "rejected" with key, source, kind and reason, not written).
    """
    writer = ShardSetWriter(out_dir, prefix, max_bytes, max_count, modality)
    try:
        for sample in samples_recording_errors(samples, writer.reject_unreadable, record_seconds):
            writer.add(sample, validate, record_seconds)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def in_validation_split(key: str, val_fraction: float, seed: int) -> bool:
    """A fixed function of (seed, key): the split does not depend on read order."""
    return val_fraction > 0 and stable_hash(seed, key) / 2 ** 64 < val_fraction


def shard_source(modality: Modality, source: str, out_dir: str | Path, val_fraction: float = 0.0, seed: int = 0,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_count: int = DEFAULT_MAX_COUNT,
                 validate: Callable[[dict], object] | None = None,
                 record_seconds: float | None = DEFAULT_RECORD_SECONDS) -> dict[str, dict]:
    """Shard `modality.read_source(source)` into `out_dir` as a "train" split (and a
    "val" split when `val_fraction > 0`); returns {split: manifest}.

    Every sample is decoded once here (`validate`, default `modality.decode`; a recipe of
    several streams decodes every stream's payload), so corrupt files are rejected with a
    reason in the manifest. Reading and decoding one input may take `record_seconds` at most
    (a reader a damaged file sends into a loop is stopped there, and the input rejected as too_slow). What `modality.shard_statistics()` measures over the train
    records is the train manifest's "statistics". A sample the source fails to read has no key to split by; it
    is listed under the train split's "rejected".
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    writers = {split: ShardSetWriter(out_dir, split, max_bytes, max_count, modality.name) for split in splits}
    statistics = modality.shard_statistics()  # measured on the train split only: what a run normalises with
    try:
        for sample in samples_recording_errors(modality.read_source(source), writers["train"].reject_unreadable,
                                               record_seconds):
            split = "val" if in_validation_split(str(sample.get("__key__")), val_fraction, seed) else "train"
            written = writers[split].add(sample, validate=validate or modality.decode, seconds=record_seconds)
            if written and split == "train" and statistics is not None:
                statistics.add(sample)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if not any(writer.inputs - len(writer.rejected) for writer in writers.values()):
        for writer in writers.values():
            writer.abort()
        reasons = [f"{r['source']}: {r['reason']}" for w in writers.values() for r in w.rejected][:3]
        raise BadInput(str(source), f"gave no usable {modality.name} records"  # BadInput: the CLI's one-line error
                       + (f" (rejected: {'; '.join(reasons)})" if reasons else ""), "no_usable_records")
    return {split: writer.close({"statistics": statistics.result()} if split == "train" and statistics else None)
            for split, writer in writers.items()}


# -- finding shards --------------------------------------------------------------------------------


def read_manifest(path: Path) -> list[dict]:
    """A manifest's shard entries ({name, count, ...}); a file that is not one is a one-line error."""
    try:
        shards = json.loads(path.read_text())["shards"]
        if not all(isinstance(shard, dict) and "name" in shard for shard in shards):
            raise TypeError
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a shard manifest (JSON with a 'shards' list of {{name, count}}); "
                          "re-shard the source, or remove it to read the folder's *.tar") from None
    return shards


def shards_in_folder(folder: Path, prefix: str | None) -> list[str]:
    """A folder's shards: those its manifest lists, else its `{prefix}-*.tar` (or all `*.tar`), sorted."""
    manifests = sorted(folder.glob(manifest_name(prefix) if prefix else manifest_name("*")))
    if prefix is None and len(manifests) > 1:
        splits = [path.name[: -len("-manifest.json")] for path in manifests]
        raise ConfigError(f"{folder} holds several splits ({', '.join(splits)}): pass prefix=..., or address "
                         f"one as the glob '{folder}/{splits[0]}-*.tar'")
    if manifests:
        listed = [str(folder / shard["name"]) for shard in read_manifest(manifests[0])]
        missing = [path for path in listed if not Path(path).is_file()]
        if missing:
            raise ConfigError(f"{manifests[0]} lists shards that are not there: {', '.join(missing[:3])}"
                             f"{' ...' if len(missing) > 3 else ''}; re-shard the source")
        return listed
    return sorted(str(path) for path in folder.glob(f"{prefix}-*.tar" if prefix else "*.tar"))


def shard_counts(shards: list[str]) -> dict[str, int]:
    """{shard: its record count} for those of `shards` that their folders' manifests list (not a
    URL or a hand-made tar): what a reader of the shard must find in it."""
    counts: dict[str, int] = {}
    for folder in {Path(shard).parent for shard in shards if not URL_SCHEME.match(shard)}:
        for manifest in folder.glob(manifest_name("*")):
            for shard in read_manifest(manifest):
                counts[str(folder / shard["name"])] = shard["count"]
    return {shard: counts[shard] for shard in shards if shard in counts}


def manifest_counts(shards: list[str]) -> int | None:
    """The number of records in `shards` according to their folders' manifests, or None
    when any shard is not listed in one (a URL, a hand-made tar)."""
    counts = shard_counts(shards)
    if any(shard not in counts for shard in shards):
        return None
    return sum(counts[shard] for shard in shards)


def resolve_local(pattern: str) -> list[str]:
    """One local path, or a glob, after brace expansion."""
    if GLOB_CHARACTERS.search(pattern):
        return sorted(glob.glob(pattern))
    if not Path(pattern).is_file():
        raise ConfigError(f"shard {pattern} does not exist")
    return [pattern]


def resolve_shards(spec: str | Path | Iterable[str | Path], prefix: str | None = None) -> list[str]:
    """The shard list that `spec` names.

    spec: a folder (its `*-manifest.json` lists the shards, else its `*.tar`;
          a folder with several splits needs `prefix`, e.g. "train"), a glob
          (`data/train-*.tar`), a brace pattern (`data/train-{000000..000009}.tar`),
          a list of any of these, or URLs and `pipe:` commands, which are passed
          through (brace-expanded) and opened while streaming.
    prefix: which split of a folder to read; only meaningful for a folder.
    """
    if not isinstance(spec, (str, Path)):
        shards = [shard for part in spec for shard in resolve_shards(part)]
        if not shards:
            raise ConfigError("the shard list is empty")
        return shards
    spec = str(spec)
    if Path(spec).is_dir():
        shards = shards_in_folder(Path(spec), prefix)
        if not shards:
            raise ConfigError(f"folder {spec} holds no {prefix + '-' if prefix else ''}*.tar shards; "
                             "write some with `polymae shard` (or pipelines.shards.shard_source)")
        return shards
    if prefix is not None:
        raise ConfigError(f"prefix={prefix!r} selects a split of a folder, but {spec!r} is not a folder")
    if URL_SCHEME.match(spec):
        return list(braceexpand.braceexpand(spec))
    shards = [shard for pattern in braceexpand.braceexpand(spec) for shard in resolve_local(pattern)]
    if not shards:
        raise ConfigError(f"no shards match {spec!r}")
    return shards
