"""`polymae reconstruct`: a picture of held-out samples, masked and reconstructed by a run."""
from __future__ import annotations

from pathlib import Path

import torch

from polymae.shared.objectives import to_value_space

from .runs import load_run, split_shards
from .stream import Loader, ShardStream


@torch.no_grad()
def reconstruct(run_or_checkpoint: str | Path, out: str | Path, rows: int = 8, seed: int = 0) -> Path:
    parts, checkpoint = load_run(run_or_checkpoint)
    train_shards, val_shards = split_shards(parts.config, parts.modality)
    stream = ShardStream(val_shards or train_shards, parts.modality, parts.masker, batch_size=rows, train=False,
                         seed=seed, split_by_rank=False)
    batch = next(b for b in Loader(stream, 0) if len(b))
    parts.model.eval()
    tokens = batch.tokens
    pred = parts.model(tokens.values, tokens.coords, batch.mask, tokens.valid)["pred"]
    picture = parts.modality.render(tokens, batch.mask, to_value_space(pred, tokens.values, parts.norm_pix), rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"{out}: {len(batch)} samples from {checkpoint}, rows of original | masked | reconstruction")
    return out
