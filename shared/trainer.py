"""The training loop every modality shares, readable in one sitting.

AdamW (no decay on norms, biases, tokens and position tables), linear warmup
then cosine decay, gradient accumulation, bf16 autocast on CPU and CUDA,
gradient clipping, a guard against non-finite losses, atomic checkpoints,
a progress bar with loss, throughput and ETA, JSON-lines metrics,
TensorBoard scalars and a reconstruction picture every N steps.

The trainer knows nothing of modalities: it gets a model, a loss function
`loss_fn(model, batch) -> (loss, parts, out)`, an optional picture function,
and `batches(epoch, start) -> iterable of Batch` that it restarts each epoch.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_state, load_weights, save_checkpoint
from .config import TrainerConfig
from .tokens import Batch

MIN_RECORDS_FOR_BAD_FRACTION = 200  # judge the bad-record share only once it means something


class TrainingError(RuntimeError):
    """The run cannot go on (too many bad records, too many non-finite losses)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms, cls/mask tokens and position tables are not decayed (MAE)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith("_token") or "position" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, base: float, floor: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, model: nn.Module, config: TrainerConfig, run_dir: Path,
                 loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, dict, dict]], config_text: str = "",
                 picture_fn: Callable[[Batch, dict], "object"] | None = None, log: Callable[[str], None] = print):
        self.config, self.run_dir, self.loss_fn = config, Path(run_dir), loss_fn
        self.picture_fn, self.config_text, self.log = picture_fn, config_text, log
        self.device = pick_device(config.device)
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=tuple(config.betas))
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.skipped: Counter = Counter()
        self.records_seen = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps: list[int] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- state ------------------------------------------------------------
    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step, "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch, "skipped": dict(self.skipped),
                "records_seen": self.records_seen, "rng": rng_state(),
                "scheduler": {"kind": "warmup_cosine", "step": self.step}}

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.model, self.state(), self.config_text,
                               self.config.keep_last)

    def resume(self) -> bool:
        """Continue from the run's latest complete checkpoint, if there is one."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return False
        load_weights(checkpoint, self.model)
        state = load_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.skipped, self.records_seen = Counter(state["skipped"]), state["records_seen"]
        set_rng_state(state["rng"])
        self.log(f"resumed from {checkpoint} at step {self.step} (epoch {self.epoch}, batch {self.batches_in_epoch})")
        return True

    # -- one step ---------------------------------------------------------
    def autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def set_lr(self) -> float:
        c = self.config
        lr = warmup_cosine(self.step, c.warmup_steps, c.max_steps, c.lr, c.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def count_records(self, batch: Batch) -> None:
        self.skipped.update(batch.skipped)
        self.records_seen += len(batch)
        bad, total = sum(self.skipped.values()), sum(self.skipped.values()) + self.records_seen
        if total >= MIN_RECORDS_FOR_BAD_FRACTION and bad / total > self.config.max_bad_fraction:
            raise TrainingError(f"{bad} of {total} records were bad ({dict(self.skipped)}), more than "
                                f"trainer.max_bad_fraction={self.config.max_bad_fraction}; fix the data or raise it")

    def guard_nonfinite(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite. A non-finite one skips the step, is logged, and
        `max_nonfinite` in a row stop the run (the last good checkpoint stays as it was)."""
        if torch.isfinite(loss).item():
            self.nonfinite_in_a_row = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_steps.append(self.step)
        self.log(f"step {self.step}: non-finite loss {loss.item()}, step skipped "
                 f"({self.nonfinite_in_a_row} in a row)")
        if self.nonfinite_in_a_row >= self.config.max_nonfinite:
            raise TrainingError(f"{self.nonfinite_in_a_row} non-finite losses in a row (steps "
                                f"{self.nonfinite_steps[-self.nonfinite_in_a_row:]}); stopping. The last good "
                                f"checkpoint is {latest_checkpoint(self.run_dir)}")
        return False

    # -- the loop ---------------------------------------------------------
    def fit(self, batches: Callable[[int, int], Iterable[Batch]]) -> dict:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        c = self.config
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        bar = tqdm(total=c.max_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        deadline = started + 60 * c.max_minutes if c.max_minutes else math.inf
        window_start, window_samples, last_loss, micro = time.perf_counter(), 0, float("nan"), 0
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        stop = False
        try:
            while not stop:
                produced = 0
                for batch in batches(self.epoch, self.batches_in_epoch):
                    produced += 1
                    self.batches_in_epoch += 1
                    self.count_records(batch)
                    if len(batch) == 0:  # a worker's last word: only skip counts
                        continue
                    batch = batch.to(self.device)
                    lr = self.set_lr()
                    with self.autocast():
                        loss, parts, out = self.loss_fn(self.model, batch)
                    if not self.guard_nonfinite(loss.detach()):
                        micro = 0
                        continue
                    (loss / c.accum_steps).backward()
                    micro += 1
                    window_samples += len(batch)
                    if micro < c.accum_steps:
                        continue
                    micro = 0
                    if c.clip_grad:
                        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
                        if not self.guard_nonfinite(grad_norm):
                            continue
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    last_loss = loss.item()
                    bar.update(1)

                    if self.step % c.log_every == 0 or self.step == c.max_steps:
                        now = time.perf_counter()
                        rate = window_samples / max(now - window_start, 1e-9)
                        window_start, window_samples = now, 0
                        record = {"step": self.step, "loss": last_loss, "lr": lr, "samples_per_s": rate,
                                  "epoch": self.epoch, "elapsed_s": now - started,
                                  **{f"loss/{k}": float(v) for k, v in parts.items()},
                                  "skipped": sum(self.skipped.values())}
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                        for key in ("loss", "lr", "samples_per_s"):
                            writer.add_scalar(f"train/{key}", record[key], self.step)
                        bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=f"{rate:.0f}", lr=f"{lr:.2e}")
                    if self.picture_fn is not None and self.step % c.picture_every == 0:
                        self.save_picture(batch, out, f"pictures/step-{self.step:06d}.png")
                    if self.step % c.ckpt_every == 0:
                        self.save()
                    if self.step >= c.max_steps or time.perf_counter() > deadline:
                        stop = True
                        break
                else:
                    self.epoch, self.batches_in_epoch = self.epoch + 1, 0
                    if produced == 0:
                        raise TrainingError("the data stream produced no batches: are the shards empty?")
            if latest_checkpoint(self.run_dir) is None or not latest_checkpoint(self.run_dir).name.endswith(
                    f"{self.step:06d}"):
                self.save()
            if self.picture_fn is not None:
                self.save_picture(batch, out, "reconstruction.png")
        finally:
            bar.close()
            writer.close()
            metrics_file.close()
        elapsed = time.perf_counter() - started
        summary = {"steps": self.step, "final_loss": last_loss, "train_seconds": elapsed,
                   "records_seen": self.records_seen, "skipped": dict(self.skipped),
                   "nonfinite_steps": self.nonfinite_steps}
        if self.skipped:
            self.log(f"skipped {sum(self.skipped.values())} bad records: "
                     + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
        return summary

    def save_picture(self, batch: Batch, out: dict, name: str) -> None:
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            picture = self.picture_fn(batch.to("cpu"), {k: v.detach().float().cpu() for k, v in out.items()})
        picture.save(path)
