"""`polymae pretrain`: shards -> stream -> trainer -> checkpoint, picture and probe."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from polymae.shared.config import Config, dump_config
from polymae.shared.objectives import to_value_space
from polymae.shared.trainer import Trainer

from .probe import format_probe, probe
from .runs import RunParts, build_parts, split_shards
from .stream import ShardStream, make_loader


def new_run_dir(config: Config) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... when it is taken (never overwrite a run)."""
    root = Path(config.out_dir)
    candidate, n = root / config.name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{config.name}-{n}"
    return candidate


def picture_fn(parts: RunParts):
    def draw(batch, out):
        pred = to_value_space(out["pred"], batch.tokens.values.float(), parts.norm_pix)
        return parts.modality.render(batch.tokens, batch.mask, pred)
    return draw


def pretrain(config: Config, resume: Path | None = None) -> dict:
    parts = build_parts(config)
    train_shards, val_shards = split_shards(config, parts.modality)
    run_dir = Path(resume) if resume else new_run_dir(config)
    data = config.data
    stream = ShardStream(train_shards, parts.modality, parts.masker, batch_size=data.batch_size, train=True,
                         shuffle_buffer=data.shuffle_buffer, seed=data.seed, resampled=data.resampled)

    def batches(epoch: int, start: int):
        stream.set_epoch(epoch)
        for i, batch in enumerate(make_loader(stream, data.num_workers)):
            if i >= start:  # resuming mid-epoch: replay the epoch's deterministic order up to the position
                yield batch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    trainer = Trainer(parts.model, config.trainer, run_dir, parts.loss, config_text=dump_config(config),
                      picture_fn=picture_fn(parts))
    if resume:
        if not trainer.resume():
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there to resume from")
    (run_dir / "config.yaml").write_text(dump_config(config))
    print(f"run folder: {run_dir}  ({sum(p.numel() for p in parts.model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train_shards)} train shards)")
    summary = trainer.fit(batches)
    summary["run_dir"] = str(run_dir)
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f}s, final loss "
          f"{summary['final_loss']:.4f}; checkpoint and reconstruction.png in {run_dir}")
    if config.probe.enabled and val_shards:
        summary["probe"] = probe(parts, train_shards, val_shards)
        print(format_probe(summary["probe"]))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
