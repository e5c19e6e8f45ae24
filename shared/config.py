"""The one config schema: typed dataclasses, YAML files, dotted overrides.

`load_config(path, ["trainer.max_steps=10", ...])` merges a YAML recipe and
command-line overrides onto the defaults and checks every key and value
against the dataclasses below. An unknown key or a bad value raises
`ConfigError` with one line naming the key and what is allowed; the CLI turns
it into exit code 2. A numeric key declares the range it allows where it is
declared (`bounded`), and `build` checks it before any dataclass is made; a
key a resumed run may change is marked RESUMABLE (`resume_changes`). The
dataclass defaults are MAE's; a recipe names the rest. With no recipe, `polymae pretrain` runs the shipped default,
configs/image/mae_vit_digits.yaml (installed as `polymae.configs`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .model import DecoderConfig, ModelConfig

# A key marked so may change when a run is resumed (`polymae pretrain --resume RUN key=value`):
# it changes neither the run's maths nor its data order (how often it logs, draws, checkpoints;
# when it stops; how it is evaluated afterwards). Every other key is fixed for the life of a run:
# a change is refused (`resume_changes`). On a dataclass-valued field it covers the whole section.
RESUMABLE = {"resumable": True}


def resumable(default):
    return field(default=default, metadata=RESUMABLE)


@dataclass(frozen=True)
class Bounds:
    """The numbers a key allows: `low` <= value (< with low_open), value <= `high` (< with
    high_open); any bound makes inf and nan invalid too. `build` checks every key that declares
    them, with the key's full dotted name, before the dataclass is made."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(part for part in (low, high) if part) or "finite"


def bounded(default, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, may_change_on_resume: bool = False):
    """A numeric key with the range it allows (None stays allowed where the key's type is optional)."""
    metadata = {"bounds": Bounds(low, high, low_open, high_open), **(RESUMABLE if may_change_on_resume else {})}
    return field(default=default, metadata=metadata)


# Bounds of keys whose dataclass lives elsewhere (shared/model.py, which config.py imports and
# which so cannot import `bounded`): width, depth and heads of 0 or less used to fall back to the
# size's default (`0 or default`) or build no blocks at all.
FOREIGN_BOUNDS = {
    ModelConfig: {name: Bounds(1) for name in ("width", "depth", "heads", "decoder_width", "decoder_heads")}
    | {"decoder_depth": Bounds(0), "mlp_ratio": Bounds(0, low_open=True), "decoder_mlp_ratio": Bounds(0, low_open=True),
       "layer_norm_eps": Bounds(0, low_open=True)},
    DecoderConfig: {"width": Bounds(1), "heads": Bounds(1), "depth": Bounds(0), "layer": Bounds(1)},
}


def check_bounds(cls: type, values: dict, prefix: str) -> None:
    for f in dataclasses.fields(cls):
        bounds = f.metadata.get("bounds") or FOREIGN_BOUNDS.get(cls, {}).get(f.name)
        value = values.get(f.name)
        if bounds is None or value is None:
            continue
        items = value if isinstance(value, (tuple, list)) else [value]
        if not all(isinstance(item, (int, float)) and bounds.allows(item) for item in items):
            raise ConfigError(f"{prefix}{f.name} must be {'each ' if items is value else ''}{bounds.describe()}; "
                              f"got {value!r}")


@dataclass
class DataConfig:
    shards: str = ""                  # folder of {train,val}-*.tar (or train: glob, brace pattern, URLs)
    val_shards: str | None = None     # labelled held-out shards for probing; None: `shards`' val split
    source: str | None = None         # shard this (a folder or built-in source) into `shards` if it holds none
    val_fraction: float = bounded(0.0, 0.0, 1.0, high_open=True)  # share of `source` held out as the labelled val split
    batch_size: int = bounded(256, 1)
    num_workers: int = bounded(2, 0)
    shuffle_buffer: int = bounded(2000, 0)  # records; 0 or 1: no shuffling
    resampled: bool = False           # infinite stream, shards drawn with replacement
    batches_per_epoch: int | None = bounded(None, 1)  # per rank; under torchrun default: manifest records // (ranks x batch)
    # decoded records each data worker keeps for the epochs after its first (a small dataset is then read
    # and decoded once); 0: none. The same batches either way (pipelines/record_cache.py)
    cache_mb: int = bounded(256, 0, may_change_on_resume=True)
    seed: int = 0


@dataclass
class MaskConfig:
    name: str | None = None           # None: the modality's default masker
    ratio: float = bounded(0.75, 0.0, 1.0, low_open=True, high_open=True)  # hidden share: some, never all
    options: dict = field(default_factory=dict)


@dataclass
class StreamConfig:
    """One stream of a recipe of several (`streams.<name>`)."""
    modality: str = ""
    keys: tuple[str, ...] | None = None   # the record's payload files this stream reads (None: the modality's)
    options: dict = field(default_factory=dict)   # checked by the modality's own Options
    mask: MaskConfig = field(default_factory=MaskConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class BudgetConfig:
    """MultiMAE's shared token budget: `visible` encoder tokens per sample, split across
    the streams by a Dirichlet(alpha) draw (each stream's mask.ratio is then unused)."""
    visible: int | None = bounded(None, 1)
    alpha: float = bounded(1.0, 0.0, low_open=True)
    sample_streams: bool = False  # MultiMAE's sample_tasks_uniformly: a random non-empty subset of streams shown



@dataclass
class TrainerConfig:
    max_steps: int = bounded(1000, 1, may_change_on_resume=True)
    max_minutes: float | None = bounded(None, 0.0, low_open=True, may_change_on_resume=True)  # wall-clock budget for the training loop
    lr: float = bounded(1.5e-4, 0.0, low_open=True)
    min_lr: float = bounded(0.0, 0.0)
    warmup_steps: int = bounded(40, 0)
    weight_decay: float = bounded(0.05, 0.0)
    betas: tuple[float, float] = bounded((0.9, 0.95), 0.0, 1.0, high_open=True)
    accum_steps: int = bounded(1, 1)
    precision: str = "auto"           # auto | bf16 | fp32 (autocast); auto: bf16 where it is measured faster
    clip_grad: float | None = bounded(1.0, 0.0, low_open=True)  # None: no clipping
    ckpt_every: int = bounded(500, 1, may_change_on_resume=True)
    keep_last: int = bounded(3, 1, may_change_on_resume=True)
    log_every: int = bounded(10, 1, may_change_on_resume=True)
    picture_every: int = bounded(500, 1, may_change_on_resume=True)
    max_nonfinite: int = bounded(5, 1, may_change_on_resume=True)            # consecutive non-finite losses before the run stops
    max_bad_fraction: float = bounded(0.1, 0.0, 1.0, may_change_on_resume=True)     # skipped / seen records above this stops the run
    device: str = "auto"              # auto | cpu | cuda
    strategy: str = "ddp"             # under torchrun: ddp (replicated) | fsdp (sharded parameters)
    seed: int = 0

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"trainer.precision must be one of auto, bf16, fp32; got {self.precision!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"trainer.strategy must be one of ddp, fsdp; got {self.strategy!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"trainer.device must be one of auto, cpu, cuda; got {self.device!r}")


@dataclass
class ProbeConfig:
    enabled: bool = True              # probe at the end of `polymae pretrain`
    knn_k: int = bounded(20, 1)
    knn_temperature: float = bounded(0.07, 0.0, low_open=True)
    max_samples: int = bounded(20000, 1)          # per split, to keep probing quick
    protocol: str = "split"           # split: fit on train, score held-out; cross_validation: k folds over
    #                                   both splits together, mean and std (small labelled sets: GraphMAE's)
    folds: int = bounded(10, 2)

    def __post_init__(self):
        if self.protocol not in ("split", "cross_validation"):
            raise ConfigError(f"probe.protocol must be split or cross_validation; got {self.protocol!r}")


@dataclass
class Config:
    name: str = resumable("mae")      # the run folder's name; only a label once the run has one
    modality: str = "image"           # a recipe of one stream (named after its modality) ...
    modality_options: dict = field(default_factory=dict)  # checked by the modality's own Options
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # the one stream's decoder or head
    streams: dict = field(default_factory=dict)            # ... or several: {name: StreamConfig}
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: dict = field(default_factory=dict)          # {} : the modality's default objective
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig, metadata=RESUMABLE)  # evaluation, after training
    out_dir: str = resumable("runs")  # where new runs go; a resumed run stays in its folder

    def __post_init__(self):
        # the run folder is out_dir/name: a name with a separator or a '..' would put it elsewhere
        if (not self.name or self.name in (".", "..") or "/" in self.name or "\\" in self.name
                or "\0" in self.name):
            raise ConfigError(f"name must be one folder name inside out_dir (no '/' or '\\', not '.' or '..'); "
                              f"got {self.name!r}")
        model = self.model.resolved()
        # the ViT's attention splits its width into heads (a GNN's or sparse CNN's heads mean other things)
        for width, heads in (("width", "heads"), ("decoder_width", "decoder_heads")) if model.encoder == "vit" else ():
            if getattr(model, width) % getattr(model, heads):
                raise ConfigError(f"model.{heads} must divide model.{width} ({getattr(model, width)}); "
                                  f"got {getattr(model, heads)}")

    def stream_configs(self) -> dict[str, StreamConfig]:
        """The recipe's streams in order: `streams`, or the one stream `modality` names."""
        if not self.streams:
            return {self.modality: StreamConfig(modality=self.modality, options=self.modality_options,
                                                mask=self.mask, decoder=self.decoder)}
        if self.modality_options:
            raise ConfigError("modality_options belongs to one-stream recipes; with streams, give "
                              "streams.<name>.options")
        out = {}
        for name, values in self.streams.items():
            if not isinstance(values, dict):
                raise ConfigError(f"streams.{name}: expected a mapping with a modality, got {values!r}")
            out[str(name)] = build(StreamConfig, values, f"streams.{name}")
            if not out[str(name)].modality:
                raise ConfigError(f"streams.{name}.modality is required (one of the registered modalities)")
        return out


# -- building dataclasses from plain dicts, with one-line errors -------------

def _check_value(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{where}: {value!r} is not a valid value")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return build(kind, value, where)
    if origin is tuple or kind is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list like [a, b], got {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        item_kinds = [args[0]] * len(value) if args and args[-1] is Ellipsis else (args or [Any] * len(value))
        return tuple(_check_value(v, k, f"{where}[{i}]") for i, (v, k) in enumerate(zip(value, item_kinds)))
    if kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build(cls: type, values: dict, where: str = ""):
    """Dataclass `cls` from a dict: unknown keys and wrong types are one-line ConfigErrors."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    prefix = f"{where}." if where else ""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'; {hint}allowed: {', '.join(known)}")
    checked = {key: _check_value(value, hints[key], f"{prefix}{key}") for key, value in values.items()}
    check_bounds(cls, checked, prefix)
    defaults = cls()
    merged = {}
    for key, value in checked.items():
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = build(type(default), {**as_dict(default), **value}, f"{prefix}{key}")
        merged[key] = value
    try:
        return cls(**merged)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {err}") from None


def as_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict:
    """'trainer.max_steps=10' -> {'trainer': {'max_steps': 10}} (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


DEFAULT_RECIPE = "image/mae_vit_digits.yaml"


def shipped_configs() -> list[str]:
    """Recipes shipped with polymae, as names relative to configs/."""
    return sorted(str(p.relative_to(config_root())) for p in config_root().rglob("*.yaml"))


def config_root() -> Path:
    import polymae.configs  # configs/ installs as package data of polymae.configs

    return Path(polymae.configs.__file__).parent


def find_config(path: str | Path) -> Path:
    """A config path, or the name of a shipped recipe such as image/colormae_vit_tiny.yaml."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = config_root() / path
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file {path} does not exist (shipped recipes: {', '.join(shipped_configs())})")


def read_recipe(path: str | Path) -> dict:
    """A YAML recipe's mapping of keys, unchecked."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except (UnicodeDecodeError, ValueError) as err:  # a binary file; a NUL or other character YAML refuses
        raise ConfigError(f"config file {path} is not a YAML text file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None) -> Config:
    """A recipe (the shipped default when `path` is None; or `values`, a recipe already read)
    plus dotted overrides, checked."""
    if values is None:
        values = read_recipe(find_config(path if path is not None else DEFAULT_RECIPE))
    for text in overrides:
        values = merge(values, parse_override(text))
    config = build(Config, values)
    config.stream_configs()  # every stream's keys checked now, with the rest
    if not config.data.shards:
        raise ConfigError("data.shards is required: a folder of shards (with data.source to create them), "
                          "a glob, a brace pattern or URLs")
    return config


def dump_config(config: Config) -> str:
    return yaml.safe_dump(as_dict(config), sort_keys=False)


# -- what a resumed run may change -----------------------------------------------------------------


def config_differences(old: Any, new: Any, where: str = "", may_change: bool = False) -> list[tuple[str, Any, Any, bool]]:
    """Every leaf key whose value differs between two configs (or two sections, or two mappings
    inside one), as (dotted key, old, new, whether a resumed run may change it: `RESUMABLE`)."""
    if dataclasses.is_dataclass(old) and type(old) is type(new):
        found = []
        for f in dataclasses.fields(old):
            found += config_differences(getattr(old, f.name), getattr(new, f.name), f"{where}{f.name}.",
                                        may_change or bool(f.metadata.get("resumable")))
        return found
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in [*old, *(k for k in new if k not in old)]:
            found += config_differences(old.get(key), new.get(key), f"{where}{key}.", may_change)
        return found
    if as_dict(old) == as_dict(new):
        return []
    return [(where.rstrip("."), as_dict(old), as_dict(new), may_change)]


def resume_changes(recorded: Config, requested: Config) -> dict[str, tuple[Any, Any]]:
    """The changes `requested` makes to a run that trained under `recorded`: {key: (old, new)},
    all of them keys a resumed run may change. ConfigError, listing them, when any other key
    differs: those change the run's maths or its data order, and the run would no longer be
    the run its checkpoints and metrics describe."""
    differences = config_differences(recorded, requested)
    refused = [f"{key} {old!r} -> {new!r}" for key, old, new, allowed in differences if not allowed]
    if refused:
        raise ConfigError("--resume cannot change what the run trains (its maths or its data order): "
                          + "; ".join(refused) + ". Start a new run for that (model.init_from=RUN starts "
                          "it from this run's weights); a resumed run may change only "
                          + ", ".join(resumable_keys()))
    return {key: (old, new) for key, old, new, _ in differences}


def resumable_keys(cls: type | None = None, where: str = "") -> list[str]:
    """The keys (or sections, as `probe.*`) the schema marks RESUMABLE."""
    cls = cls or Config
    keys = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if f.metadata.get("resumable"):
            keys.append(f"{where}{f.name}" + (".*" if dataclasses.is_dataclass(kind) else ""))
        elif dataclasses.is_dataclass(kind):
            keys += resumable_keys(kind, f"{where}{f.name}.")
    return keys
