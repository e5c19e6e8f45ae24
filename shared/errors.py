"""The one error type for bad input.

Adapters, decoders and the shard reader raise `BadInput(source, problem, kind)`:
`source` names the file or record, `problem` says what is wrong, `kind` is
a short category ("corrupt_image", "missing_payload", ...) under which a
training run counts it when it skips the record.
"""
from __future__ import annotations

import contextlib
import errno
from typing import Callable


class BadInput(ValueError):
    def __init__(self, source: str, problem: str, kind: str = "bad_record"):
        self.source, self.problem, self.kind = source, problem, kind
        super().__init__(f"{source}: {problem}")


def failed(source: str, doing: str, error: BaseException, kind: str) -> BadInput:
    """A library's own exception on odd input (decoders and parsers raise many kinds) as the BadInput
    that names the input, so one strange file is one rejected input, never the end of a run."""
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else ""
    return BadInput(source, f"{doing} ({type(error).__name__}{': ' + first if first else ''})", kind)


class ConfigError(ValueError):
    """A config key or value that the schema does not allow; the CLI prints it as one line."""


class TrainingError(RuntimeError):
    """The run cannot go on (no usable record, too many bad records, too many non-finite losses);
    the CLI prints it as one line."""


def describe_skipped(skipped: dict[str, int]) -> str:
    """Skip counts by kind, `kind=count`; a kind counted per input (`kind:where`, as records missing
    from a damaged shard are) is summed and names its inputs: missing_records=573 [a.tar: 191, ...]
    (brackets: the whole list often stands in parentheses of its own)."""
    totals: dict[str, int] = {}
    where: dict[str, list[str]] = {}
    for key, count in skipped.items():
        kind, _, place = key.partition(":")
        totals[kind] = totals.get(kind, 0) + count
        if place:
            where.setdefault(kind, []).append(f"{place}: {count}")
    return ", ".join(f"{kind}={count}" + (f" [{', '.join(sorted(where[kind]))}]" if kind in where else "")
                     for kind, count in sorted(totals.items())) or "none counted"


def no_usable_records(where: str, usable: int, skipped: dict) -> TrainingError:
    """The one message for data of which nothing can be used, with the bad records' counts by kind
    (the trainer after an epoch of skip reports, a data worker that cannot fill its batches)."""
    return TrainingError(f"no record of the data could be used: {where} gave {usable} usable records and "
                         f"{sum(skipped.values())} bad ones ({describe_skipped(skipped)}); check the shards and "
                         "the recipe's modality options against them")


class DiskFull(TrainingError):
    """A write that found the disk (or the user's quota) full; the CLI prints it as one line."""


FULL_DISK = {errno.ENOSPC, errno.EDQUOT}


@contextlib.contextmanager
def writing(path, then: Callable[[], str] | None = None):
    """Writes to `path` inside this block that find the disk full end the command with one line
    naming the path ("no space left on device"), and `then()` (what was kept, what to do)."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL_DISK:
            raise
        raise DiskFull(f"no space left on device writing {path}" + (f"; {then()}" if then else "")) from None


class CheckpointError(RuntimeError):
    """No checkpoint that can be trusted where one is needed (every one damaged, or the one named
    is); the CLI prints it as one line."""


class RunFolderInUse(RuntimeError):
    """A run folder another live process holds (its lock names the process); the CLI prints it as one line."""
