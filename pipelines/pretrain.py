"""`polymae pretrain`: shards -> stream -> trainer -> checkpoint, picture and probe.

Under torchrun the same command trains data-parallel (see shared/distributed.py);
rank 0 shards the source, names the run folder, writes and probes.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from polymae.shared import distributed
from polymae.shared.checkpoint import intact_checkpoint_kept
from polymae.shared.config import Config, dump_config
from polymae.shared.errors import ConfigError, writing
from polymae.shared.trainer import Trainer

from .probe import format_heldout, format_probe, heldout_losses, probe
from .runs import (CHANGES_FILE, CONFIG_FILE, LOCK_FILE, RunLock, build_parts, check_resume, draw_streams, load_run,
                   prepare_modalities, record_changes, run_folder, split_shards, stream_modalities)
from .shards import manifest_counts
from .stream import Loader, ShardStream


def batches_per_rank(config: Config, train_shards: list[str], world_size: int) -> int | None:
    """How many batches every rank takes per epoch, so that no rank waits for another at an epoch's end.
    Any number of shards feeds any number of ranks and workers: with fewer shards than readers, the
    readers share them by record index (ShardStream.assigned_shards)."""
    data = config.data
    if data.batches_per_epoch is not None or world_size == 1:
        return data.batches_per_epoch
    if data.resampled:
        raise ConfigError("data.resampled=true under torchrun needs data.batches_per_epoch (the length of an epoch)")
    records = manifest_counts(train_shards)
    if records is None:
        raise ConfigError("under torchrun, shards without a manifest need data.batches_per_epoch "
                          "(batches per rank per epoch)")
    per_rank = records // (world_size * data.batch_size)
    if per_rank == 0:
        raise ConfigError(f"{records} records make no full batch of {data.batch_size} on each of {world_size} "
                          "ranks: lower data.batch_size")
    return per_rank


def pretrain(config: Config, resume: Path | None = None) -> dict:
    context = distributed.setup(config.trainer.device)
    try:
        return run(config, context, resume)
    finally:
        distributed.teardown()


def run(config: Config, context: distributed.DistributedContext, resume: Path | None) -> dict:
    """Rank 0 holds the run folder's lock from before any work on a resumed run (a second process
    on a live run is refused at once), and from the moment it claims a new one, to the end."""
    with ExitStack() as held:
        if resume and context.is_main:
            with writing(Path(resume) / LOCK_FILE, lambda: intact_checkpoint_kept(Path(resume))):
                held.enter_context(RunLock(Path(resume)))
        changes = check_resume(Path(resume), config) if resume else {}  # before any work: refused at once
        return train_in_run_folder(config, context, resume, held, changes)


def train_in_run_folder(config: Config, context: distributed.DistributedContext, resume: Path | None,
                        held: ExitStack, changes: dict) -> dict:
    modalities = stream_modalities(config)
    if context.is_main:  # shard once (and fit a tokenizer once), before the others look for the shards
        train_shards, val_shards = split_shards(config, modalities)
        prepare_modalities(config, modalities)
    distributed.barrier()
    if not context.is_main:
        train_shards, val_shards = split_shards(config, modalities)
    parts = build_parts(config, start_weights=resume is None, modalities=modalities)  # resumed: its own weights
    run_dir = run_folder(config, context, resume, held)
    data = config.data
    stream = ShardStream(train_shards, parts.streams, batch_size=data.batch_size, train=True,
                         shuffle_buffer=data.shuffle_buffer, seed=data.seed, resampled=data.resampled,
                         batches_per_epoch=batches_per_rank(config, train_shards, context.world_size),
                         visible_budget=config.budget.visible, budget_alpha=config.budget.alpha,
                         budget_sample_streams=config.budget.sample_streams,
                         cache_bytes=data.cache_mb * 2 ** 20)

    loader = Loader(stream, data.num_workers, device=context.device)

    def batches(epoch: int, start: int):
        stream.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= start:  # resuming mid-epoch: replay the epoch's deterministic order up to the position
                yield batch

    trainer = Trainer(parts.module, config.trainer, run_dir, config_text=dump_config(config),
                      picture_fn=lambda batch, outputs: draw_streams(parts, batch, outputs), context=context)
    if resume and not trainer.resume():
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there to resume from")
    if context.is_main:
        if resume:
            with writing(run_dir / CHANGES_FILE, lambda: intact_checkpoint_kept(run_dir)):
                record_changes(run_dir, trainer.step, changes)
        else:
            with writing(run_dir / CONFIG_FILE):
                (run_dir / CONFIG_FILE).write_text(dump_config(config))
        print(f"run folder: {run_dir}  ({sum(p.numel() for p in parts.model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_shards)} train shards, {context.world_size} rank(s) on {context.device})")
    summary = trainer.fit(batches)
    summary["run_dir"] = str(run_dir)
    if not context.is_main:
        return summary
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f}s, final loss "
          f"{summary['final_loss']:.4f}; checkpoint and reconstruction.png in {run_dir}")
    if config.probe.enabled and val_shards:  # from the checkpoint: the same path for DDP, FSDP and one process
        trained = load_run(run_dir)[0]
        summary["heldout"] = heldout_losses(trained, train_shards, val_shards, context.device)
        print(format_heldout(summary["heldout"]))
        summary["probe"] = probe(trained, train_shards, val_shards)
        print(format_probe(summary["probe"]))
    with writing(run_dir / "summary.json"):
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
