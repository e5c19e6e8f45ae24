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


def build_parts(config: Config) -> RunParts:
    """The modality, masker and a freshly initialised model (seeded by trainer.seed)."""
    modality = MODALITIES.get(config.modality)(config.modality_options)
    masker = build_masker(config.mask.name or modality.default_masker, config.mask.ratio, **config.mask.options)
    torch.manual_seed(config.trainer.seed)
    model = modality.build_model(config.model)
    return RunParts(config, modality, masker, model)


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
    parts = build_parts(config)
    load_weights(checkpoint, parts.model)
    return parts, checkpoint
