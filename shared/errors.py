"""The one error type for bad input.

Adapters, decoders and the shard reader raise `BadInput(source, problem, kind)`:
`source` names the file or record, `problem` says what is wrong, `kind` is
a short category ("corrupt_image", "missing_payload", ...) under which a
training run counts it when it skips the record.
"""
from __future__ import annotations


class BadInput(ValueError):
    def __init__(self, source: str, problem: str, kind: str = "bad_record"):
        self.source, self.problem, self.kind = source, problem, kind
        super().__init__(f"{source}: {problem}")


class ConfigError(ValueError):
    """A config key or value that the schema does not allow; the CLI prints it as one line."""


class TrainingError(RuntimeError):
    """The run cannot go on (no usable record, too many bad records, too many non-finite losses);
    the CLI prints it as one line."""


def no_usable_records(where: str, usable: int, skipped: dict) -> TrainingError:
    """The one message for data of which nothing can be used, with the bad records' counts by kind
    (the trainer after an epoch of skip reports, a data worker that cannot fill its batches)."""
    kinds = ", ".join(f"{kind}={count}" for kind, count in sorted(skipped.items())) or "none counted"
    return TrainingError(f"no record of the data could be used: {where} gave {usable} usable records and "
                         f"{sum(skipped.values())} bad ones ({kinds}); check the shards and the recipe's "
                         "modality options against them")


class CheckpointError(RuntimeError):
    """No checkpoint that can be trusted where one is needed (every one damaged, or the one named
    is); the CLI prints it as one line."""


class RunFolderInUse(RuntimeError):
    """A run folder another live process holds (its lock names the process); the CLI prints it as one line."""
