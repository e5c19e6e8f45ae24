"""What pretrain, probe and reconstruct share: building a run's parts from its
config, finding its shards, claiming and locking a run folder, and loading a
finished run back."""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import polymae.modalities  # noqa: F401  (registers the modalities)
from polymae.shared import distributed
from polymae.shared.checkpoint import load_weights, process_is_running, resolve_checkpoint
from polymae.shared.config import Config, build, load_config, merge, read_recipe, resume_changes
from polymae.shared.errors import ConfigError, RunFolderInUse, writing
from polymae.shared.masking import Masker
from polymae.shared.model import build_model
from polymae.shared.objectives import LossTerms, Pretraining, layers_read
from polymae.shared.modality import Modality
from polymae.shared.registry import MASKERS, MODALITIES

from .shards import resolve_shards, shard_source
from .stream import StreamSpec, read_shard


LOCK_FILE = ".lock"


class RunLock:
    """One process at a time in a run folder: an exclusive `flock` on <run>/.lock, which holds the
    holder's pid. The kernel drops the lock when its process ends, however it ends (SIGKILL
    included), so a lock is never stale in fact; the pid left in the file by a process that died
    holding it is only reported ("taking over"), as filelock and torch.distributed's elastic
    agent do. The file itself stays: deleting it would let a process that opened the old file
    and one that creates a new one both hold "the" lock."""

    def __init__(self, run_dir: Path, log=print):
        self.path, self.log, self.handle = Path(run_dir) / LOCK_FILE, log, None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.recorded_pid(handle)
            handle.close()
            raise RunFolderInUse(f"run folder {self.path.parent} is in use by process {holder if holder else '?'} "
                                 f"(it holds {self.path}); wait for it to end, or stop it, before running "
                                 "there again") from None
        previous = self.recorded_pid(handle)
        if previous is not None and previous != os.getpid():
            state = "still running, but not holding the lock" if process_is_running(previous) else "no longer running"
            self.log(f"taking over the stale lock of {self.path.parent} left by process {previous} ({state})")
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        except BaseException:  # a full disk: no lock held past the error
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            raise
        self.handle = handle
        return self

    @staticmethod
    def recorded_pid(handle) -> int | None:
        handle.seek(0)
        text = handle.read().strip()
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self.handle is None:
            return
        self.handle.seek(0)
        self.handle.truncate()  # a clean release leaves no pid to report as stale
        self.handle.flush()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim_new_run_dir(out_dir: str | Path, name: str) -> Path:
    """Create and return <out_dir>/<name>, or <name>-2, -3, ... when it is taken (never overwrite a
    run). The folder is claimed by creating it (mkdir is atomic), so two runs started at the same
    moment under one name get two folders."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    candidate, n = root / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = root / f"{name}-{n}"


def run_folder(config: Config, context, resume: Path | None, held) -> Path:
    """The run's folder: a resumed run's own, or a new one rank 0 claims and locks (held in `held`, an
    ExitStack, to the end of the run) and every rank learns."""
    if resume:
        return Path(resume)
    claimed = None
    if context.is_main:
        claimed = claim_new_run_dir(config.out_dir, config.name)
        with writing(claimed / LOCK_FILE):
            held.enter_context(RunLock(claimed))
    return Path(distributed.all_gather_objects(str(claimed))[0])


CONFIG_FILE = "config.yaml"            # the recipe the run started with; never rewritten
CHANGES_FILE = "config_changes.jsonl"  # each change a resumed run made, with the step it took effect


def dotted(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def recorded_config_values(run_dir: Path) -> dict:
    """The recipe a run trains under now: its config.yaml with the changes of its resumes applied."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_FILE} there (not a polymae run folder)")
    values = read_recipe(path)
    changes = Path(run_dir) / CHANGES_FILE
    for line in changes.read_text().splitlines() if changes.is_file() else []:
        for key, (_, new) in json.loads(line)["changes"].items():
            values = merge(values, dotted(key, new))
    return values


def resumed_config(run_dir: Path, recipe: str | Path | None, overrides: list[str]) -> Config:
    """What `--resume RUN [recipe] key=value ...` asks to train under: the run's recorded recipe
    (or the recipe given) with the overrides; `check_resume` then compares it with the run's."""
    if recipe is not None:
        return load_config(recipe, overrides)
    return load_config(values=recorded_config_values(run_dir), overrides=overrides)


def check_resume(run_dir: Path, config: Config) -> dict:
    """The changes `config` makes to the run in `run_dir` ({key: (old, new)}); ConfigError when one
    would change the run's maths or data order (the schema's RESUMABLE marks say which may change)."""
    return resume_changes(build(Config, recorded_config_values(run_dir)), config)


def record_changes(run_dir: Path, step: int, changes: dict, log=print) -> None:
    """Append the changes a resume made, and the step from which they hold, to the run's change log."""
    if not changes:
        return
    with open(Path(run_dir) / CHANGES_FILE, "a") as handle:
        handle.write(json.dumps({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "changes": {key: list(pair) for key, pair in changes.items()}}) + "\n")
    log(f"from step {step} on: " + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
        + f" (recorded in {Path(run_dir) / CHANGES_FILE})")


@dataclass
class RunParts:
    config: Config
    streams: list[StreamSpec]
    module: Pretraining       # the model and its loss terms: what the trainer optimises

    @property
    def model(self) -> torch.nn.Module:
        return self.module.model

    @property
    def modalities(self) -> dict:
        return {spec.name: spec.modality for spec in self.streams}

    @property
    def objective(self) -> dict:
        """The recipe's loss terms, or the default terms of each stream's modality."""
        if self.config.objective:
            return self.config.objective
        if len(self.streams) == 1:
            return self.streams[0].modality.default_objective
        return {f"{spec.name}_{term}": {**options, "stream": spec.name, "term": options.get("term", term)}
                for spec in self.streams for term, options in spec.modality.default_objective.items()}

    def norm_pix(self, stream: str) -> bool:
        """Whether the stream's reconstruction target is per-token normalised (pictures undo it)."""
        names = [spec.name for spec in self.streams]
        return any(options.get("norm_pix", False) for options in self.objective.values()
                   if options.get("stream", names[0] if len(names) == 1 else None) == stream)


def stream_modalities(config: Config) -> dict[str, Modality]:
    """Each stream's modality, with its options checked (no model, no masker yet)."""
    modalities = {}
    for name, stream in config.stream_configs().items():
        try:
            modality_class = MODALITIES.get(stream.modality)
        except KeyError as error:
            raise ConfigError(f"{'modality' if not config.streams else f'streams.{name}.modality'}: "
                              f"{error.args[0]}") from None
        where = "modality_options" if not config.streams else f"streams.{name}.options"
        modalities[name] = modality_class(stream.options, payload_keys=stream.keys, where=where)
        try:  # a misspelt masker fails before any data
            MASKERS.get(stream.mask.name or modalities[name].default_masker)
        except KeyError as error:
            raise ConfigError(f"{'mask.name' if not config.streams else f'streams.{name}.mask.name'}: "
                              f"{error.args[0]}") from None
    return modalities


def prepare_modalities(config: Config, modalities: dict[str, Modality]) -> None:
    """`Modality.prepare` on the train shards of a local shard folder (a tokenizer learnt once)."""
    folder = Path(config.data.shards)
    if not folder.is_dir() or not any(folder.glob("train-*.tar")):
        return
    shards = resolve_shards(folder, prefix="train")

    def records():
        for shard in shards:
            yield from read_shard(shard)

    for modality in modalities.values():
        modality.prepare(folder, records)


def stream_masker(config: Config, name: str, modality: Modality) -> Masker:
    """A stream's masker, refused when it is made for another modality's tokens (`Masker.modalities`):
    it would read coordinates or fields that mean something else there, and train on that silently."""
    mask = config.stream_configs()[name].mask
    made = MASKERS.get(mask.name or modality.default_masker)
    fits = getattr(getattr(made, "func", made), "modalities", ())  # a class, or a partial of one
    if fits and modality.name not in fits:
        key = "mask.name" if not config.streams else f"streams.{name}.mask.name"
        raise ConfigError(f"{key}: {mask.name!r} masks {' or '.join(fits)} streams, not {modality.name} ones; "
                          f"a {modality.name} stream takes a generic masker (random, block, ...) or its own "
                          f"(default {modality.default_masker!r})")
    return modality.masker(mask.name, mask.ratio, mask.options)


def build_parts(config: Config, start_weights: bool = True,
                modalities: dict[str, Modality] | None = None) -> RunParts:
    """Each stream's modality (prepared on the shards) and masker, the model and its loss
    terms: freshly initialised (seeded by trainer.seed), then, with `start_weights`, loaded
    from `model.init_from` when the recipe names weights to start from."""
    modalities = modalities or stream_modalities(config)
    prepare_modalities(config, modalities)
    stream_configs = config.stream_configs()
    streams = [StreamSpec(name, modality, stream_masker(config, name, modality)) for name, modality in modalities.items()]
    torch.manual_seed(config.trainer.seed)
    decoders = {name: stream.decoder for name, stream in stream_configs.items()}
    parts = RunParts(config, streams, None)  # type: ignore[arg-type]
    model = build_model(modalities, decoders, config.model, taps=layers_read(parts.objective))
    parts.module = Pretraining(model, LossTerms(parts.objective, list(modalities), model))
    if start_weights and config.model.init_from:
        load_start_weights(parts, config.model.init_from)
    return parts


def load_start_weights(parts: RunParts, source: str) -> None:
    """`model.init_from`: a local Hugging Face folder a stream's modality can import
    (`Modality.import_weights` says whether its model type is one it reads) or a polymae run or checkpoint
    folder (another recipe's run, continued under this one)."""
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        for spec in parts.streams:
            importer = getattr(spec.modality, "import_weights", None)
            if importer is not None and importer(parts.model, path, spec.name):
                return
        raise ConfigError(f"model.init_from {source}: no stream's modality imports this Hugging Face folder "
                          f"(streams: {', '.join(s.modality.name for s in parts.streams)})")
    try:
        checkpoint = resolve_checkpoint(path)
    except FileNotFoundError:
        raise ConfigError(f"model.init_from {source}: neither a Hugging Face folder (config.json) nor a polymae "
                          "run or checkpoint folder") from None
    try:
        load_weights(checkpoint, parts.model, prefix="model.")
    except RuntimeError as error:  # missing keys or other shapes: another architecture
        first = str(error).strip().splitlines()[1:2] or [str(error)]
        raise ConfigError(f"model.init_from {checkpoint}: its weights do not fit this recipe's model "
                          f"({first[0].strip()}); use the model settings of {checkpoint / 'config.yaml'}") from None


def validate_all_streams(modalities: dict[str, Modality]):
    def validate(sample: dict) -> None:
        for modality in modalities.values():
            modality.decode(sample)
    return validate


def source_reader(modalities: dict[str, Modality], source: str) -> Modality:
    """The stream modality that offers `source` as a built-in; else the first (folders)."""
    for modality in modalities.values():
        if source in modality.sources():
            return modality
    return next(iter(modalities.values()))


def split_shards(config: Config, modalities: dict[str, Modality]) -> tuple[list[str], list[str] | None]:
    """(train shards, labelled val shards or None), sharding `data.source` first when needed
    (its records decoded by every stream's modality, so a record bad for any is rejected)."""
    data = config.data
    folder = Path(data.shards)
    if data.source and not (folder / "train-manifest.json").is_file():
        print(f"sharding {data.source!r} into {folder} ...")
        shard_source(source_reader(modalities, data.source), data.source, folder, val_fraction=data.val_fraction,
                     seed=data.seed, validate=validate_all_streams(modalities))
    train = resolve_shards(data.shards, prefix="train") if folder.is_dir() else resolve_shards(data.shards)
    if data.val_shards:
        return train, resolve_shards(data.val_shards)
    has_val = folder.is_dir() and any(folder.glob("val-*.tar"))
    return train, resolve_shards(data.shards, prefix="val") if has_val else None


def load_run(path: str | Path) -> tuple[RunParts, Path]:
    """A run folder or checkpoint folder -> its parts with the checkpoint's weights loaded."""
    checkpoint = resolve_checkpoint(path)
    config = build(Config, yaml.safe_load((checkpoint / "config.yaml").read_text()))
    parts = build_parts(config, start_weights=False)  # the checkpoint's own weights follow
    load_weights(checkpoint, parts.module)
    return parts, checkpoint


def draw_streams(parts: RunParts, batch, outputs, rows: int = 8):
    """Every stream's picture (`Modality.render`: original | masked | reconstruction), one
    under the other with the stream's name above it when there are several."""
    from PIL import Image, ImageDraw

    from polymae.shared.objectives import to_value_space

    pictures = []
    for spec in parts.streams:
        tokens = batch.streams[spec.name]
        hidden, _ = batch.stream_mask(spec.name)
        pred = outputs.pred(spec.name)
        if tokens.values is not None:
            pred = to_value_space(pred, tokens.values.float(), parts.norm_pix(spec.name))
        pictures.append((spec.name, spec.modality.render(tokens, hidden, pred, rows)))
    if len(pictures) == 1:
        return pictures[0][1]
    header = 16
    width = max(p.width for _, p in pictures)
    canvas = Image.new("RGB", (width, sum(p.height + header for _, p in pictures)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for name, picture in pictures:
        draw.text((4, top + 2), f"stream {name}", fill=(0, 0, 0))
        canvas.paste(picture.convert("RGB"), (0, top + header))
        top += picture.height + header
    return canvas
