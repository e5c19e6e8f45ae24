"""What pretrain, probe and reconstruct share: building a run's parts from its
config, finding its shards, and loading a finished run back."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

import polymae.modalities  # noqa: F401  (registers the modalities)
from polymae.shared.checkpoint import load_weights, resolve_checkpoint
from polymae.shared.config import Config, build
from polymae.shared.errors import ConfigError
from polymae.shared.hf_interop import is_hf_folder, load_hf_weights
from polymae.shared.masking import Masker, build_masker
from polymae.shared.modality import Modality
from polymae.shared.model import MaskedAutoencoder
from polymae.shared.objectives import total_loss
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Batch

from .shards import resolve_shards, shard_source


@dataclass
class RunParts:
    config: Config
    modality: Modality
    masker: Masker
    model: MaskedAutoencoder

    @property
    def objective(self) -> dict:
        return self.config.objective or self.modality.default_objective

    @property
    def norm_pix(self) -> bool:
        return any(options.get("norm_pix", False) for options in self.objective.values())

    def loss(self, model: torch.nn.Module, batch: Batch):
        tokens = batch.tokens
        out = model(tokens.values, tokens.coords, batch.mask, tokens.valid)
        loss, parts = total_loss(self.objective, out, batch)
        return loss, parts, out


def build_parts(config: Config, start_weights: bool = True) -> RunParts:
    """The modality, masker and the model: freshly initialised (seeded by trainer.seed), then, with
    `start_weights`, loaded from `model.init_from` when the recipe names weights to start from."""
    modality = MODALITIES.get(config.modality)(config.modality_options)
    masker = build_masker(config.mask.name or modality.default_masker, config.mask.ratio, **config.mask.options)
    torch.manual_seed(config.trainer.seed)
    model = modality.build_model(config.model)
    if start_weights and config.model.init_from:
        load_start_weights(model, config.model.init_from)
    return RunParts(config, modality, masker, model)


def load_start_weights(model: MaskedAutoencoder, source: str) -> None:
    """`model.init_from`: a local Hugging Face ViTMAE folder (config.json + weights) or a polymae
    run or checkpoint folder (another recipe's run, continued under this one)."""
    path = Path(source).expanduser()
    if is_hf_folder(path):
        load_hf_weights(model, path)
        return
    try:
        checkpoint = resolve_checkpoint(path)
    except FileNotFoundError:
        raise ConfigError(f"model.init_from {source}: neither a Hugging Face folder (config.json) nor a polymae "
                          "run or checkpoint folder") from None
    try:
        load_weights(checkpoint, model)
    except RuntimeError as error:  # missing keys or other shapes: another architecture
        first = str(error).strip().splitlines()[1:2] or [str(error)]
        raise ConfigError(f"model.init_from {checkpoint}: its weights do not fit this recipe's model "
                          f"({first[0].strip()}); use the model settings of {checkpoint / 'config.yaml'}") from None


def split_shards(config: Config, modality: Modality) -> tuple[list[str], list[str] | None]:
    """(train shards, labelled val shards or None), sharding `data.source` first when needed."""
    data = config.data
    folder = Path(data.shards)
    if data.source and not (folder / "train-manifest.json").is_file():
        print(f"sharding {data.source!r} into {folder} ...")
        shard_source(modality, data.source, folder, val_fraction=data.val_fraction, seed=data.seed)
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
    load_weights(checkpoint, parts.model)
    return parts, checkpoint
