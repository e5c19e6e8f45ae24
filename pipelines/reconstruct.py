"""`polymae reconstruct`: a picture of held-out samples, masked and reconstructed by a run."""
from __future__ import annotations

from pathlib import Path

import torch

from .runs import draw_streams, load_run, split_shards
from .stream import Loader, ShardStream


@torch.no_grad()
def reconstruct(run_or_checkpoint: str | Path, out: str | Path, rows: int = 8, seed: int = 0) -> Path:
    parts, checkpoint = load_run(run_or_checkpoint)
    train_shards, val_shards = split_shards(parts.config, parts.modalities)
    budget = parts.config.budget
    stream = ShardStream(val_shards or train_shards, parts.streams, batch_size=rows, train=False, seed=seed,
                         split_by_rank=False, visible_budget=budget.visible, budget_alpha=budget.alpha)
    batch = next(b for b in Loader(stream, 0) if len(b))
    parts.model.eval()
    picture = draw_streams(parts, batch, parts.model(batch), rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"{out}: {len(batch)} samples from {checkpoint}, rows of original | masked | reconstruction")
    return out
