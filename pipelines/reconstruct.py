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
                         split_by_rank=False, visible_budget=budget.visible, budget_alpha=budget.alpha,
                         budget_sample_streams=budget.sample_streams)
    batch = next(b for b in Loader(stream, 0) if len(b))
    parts.model.eval()
    outputs = parts.model(batch)
    picture = draw_streams(parts, batch, outputs, rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"{out}: {len(batch)} samples from {checkpoint}, rows of original | masked | reconstruction")
    for gif in animations(parts, batch, outputs, out, rows):
        print(f"{gif}: the same, animated")
    return out


def animations(parts, batch, outputs, out: Path, rows: int) -> list[Path]:
    """An animated GIF beside the picture for each stream whose modality animates (`animate`:
    frames of original | masked | reconstruction, e.g. a video's clips)."""
    from polymae.shared.objectives import to_value_space

    written = []
    for spec in parts.streams:
        animate = getattr(spec.modality, "animate", None)
        if animate is None:
            continue
        tokens = batch.streams[spec.name]
        hidden, _ = batch.stream_mask(spec.name)
        pred = to_value_space(outputs.pred(spec.name), tokens.values.float(), parts.norm_pix(spec.name))
        frames = animate(tokens, hidden, pred, rows)
        gif = out.with_name(out.stem + ("" if len(parts.streams) == 1 else f"-{spec.name}") + ".gif")
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=200, loop=0)
        written.append(gif)
    return written
