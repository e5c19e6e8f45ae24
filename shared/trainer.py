"""The training loop every modality shares, readable in one sitting.

AdamW (no decay on norms, biases, tokens and position tables), linear warmup
then cosine decay, gradient accumulation, bf16 autocast on CPU and CUDA,
gradient clipping, a guard against non-finite losses, atomic checkpoints,
a progress bar with loss, throughput and ETA, JSON-lines metrics,
TensorBoard scalars and a reconstruction picture every N steps.

The trainer knows nothing of modalities: it gets one module,
`module(batch) -> (loss, parts, outputs)` (shared/objectives.py's
`Pretraining`: the model and its loss terms, whose own parameters are
optimised and checkpointed alike), an optional picture function, and
`batches(epoch, start) -> iterable of Batch` that it restarts each epoch
(`start` skips the batches a resumed run has already trained on). Batches
arrive on the trainer's device, finished (pipelines/stream.py's Loader moves
them once).

Under torchrun it wraps the model in DDP or FSDP; every rank must see the
same number of batches (the stream's per-rank quota guarantees it), every
collective happens at the same step on every rank, and only rank 0 writes.
"""
from __future__ import annotations

import functools
import hashlib
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
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .checkpoint import checkpoint_dirs, latest_checkpoint, load_state, newest_intact, save_checkpoint
from .config import TrainerConfig
from .distributed import DistributedContext, all_gather_objects, all_reduce, barrier, wrap
from .errors import CheckpointError, TrainingError, describe_skipped, no_usable_records, writing
from .kernels import chosen_paths, cpu_features, pin_paths
from .memory import reuse_freed_memory
from .tokens import Batch

MIN_RECORDS_FOR_BAD_FRACTION = 200  # judge the bad-record share only once it means something
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def bf16_is_faster(device_type: str) -> bool:
    """Whether bf16 matmuls beat fp32 here, measured once (a 512^3 matmul, best of 5): with
    AMX or AVX-512 BF16 they are 2-8x faster, on an AVX2-only CPU about 20x slower."""
    if device_type != "cpu":
        return True
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        timings[dtype] = best
    return timings[torch.bfloat16] < timings[torch.float32]


def resolve_precision(precision: str, device: torch.device) -> str:
    """`trainer.precision`: bf16 and fp32 as asked; auto: bf16 on GPUs and on CPUs whose flags
    say they multiply bf16 in hardware (AMX, AVX-512 BF16), fp32 on the others; where the flags
    are unknown (not Linux), bf16 where it is measured faster."""
    if precision != "auto":
        return precision
    if device.type == "cpu" and cpu_features().native_bf16 is not None:
        return "bf16" if cpu_features().native_bf16 else "fp32"
    return "bf16" if bf16_is_faster(device.type) else "fp32"


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """MAE decays matrices only: biases, norms, cls/mask tokens and position tables are not decayed."""
    return param.ndim < 2 or name.endswith("_token") or "position" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(groups: list[dict], **options) -> torch.optim.AdamW:
    """Fused AdamW where torch has it for the parameters' device (2-4x faster steps on CPU), else the default."""
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, ValueError, TypeError):  # e.g. FSDP's DTensor parameters
        return torch.optim.AdamW(groups, **options)


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
    def __init__(self, module: nn.Module, config: TrainerConfig, run_dir: Path, config_text: str = "",
                 picture_fn: Callable[[Batch, "object"], "object"] | None = None, log: Callable[[str], None] = print,
                 context: DistributedContext | None = None):
        reuse_freed_memory()  # activations are megabytes, freed and reallocated every step
        self.config, self.run_dir = config, Path(run_dir)
        self.picture_fn, self.config_text = picture_fn, config_text
        self.context = context or DistributedContext(device=pick_device(config.device))
        self.log = log if self.context.is_main else (lambda message: None)
        self.device = self.context.device
        self.model = wrap(module.to(self.device), self.context, config.strategy)
        self.optimizer = make_adamw(param_groups(self.model, config.weight_decay), lr=config.lr,
                                    betas=tuple(config.betas))
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.skipped: Counter = Counter()
        self.records_seen = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_steps: list[int] = []
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- state ------------------------------------------------------------
    def state(self, optimizer_state: dict) -> dict:
        return {"optimizer": optimizer_state, "step": self.step, "epoch": self.epoch,
                "batches_in_epoch": self.batches_in_epoch, "skipped": dict(self.skipped),
                "records_seen": self.records_seen, "rng": rng_state(),
                "scheduler": {"kind": "warmup_cosine", "step": self.step},
                "kernel_paths": chosen_paths()}  # a resumed run takes the same paths: they round differently

    def save(self) -> None:
        """Gather full (unsharded, unwrapped) weights and optimizer state; rank 0 writes them."""
        weights, optimizer_state = get_state_dict(self.model, self.optimizer, options=FULL_STATE)
        if self.context.is_main:
            save_checkpoint(self.run_dir, self.step, weights, self.state(optimizer_state), self.config_text,
                            self.config.keep_last)
        barrier()

    def resume(self) -> bool:
        """Continue from the run's newest intact checkpoint (False: the run has no checkpoint).
        Newer ones that fail their checksums are passed over, each named with the reason;
        CheckpointError when there are checkpoints but none is intact, or when the intact one does
        not fit this run's model (the checksums say its files are as written: falling back to an
        older one would not help)."""
        if not checkpoint_dirs(self.run_dir):
            return False
        checkpoint, skipped = newest_intact(self.run_dir)
        for damaged, why in skipped:
            self.log(f"skipped checkpoint {damaged}: {why}")
        if checkpoint is None:
            raise CheckpointError(f"{self.run_dir}: no intact checkpoint to resume from ("
                                  + "; ".join(f"{c.name}: {why}" for c, why in skipped) + ")")
        try:
            self.load_checkpoint(checkpoint)
        except (RuntimeError, KeyError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{checkpoint} is intact but does not load into this run's model ({first[:300]})") \
                from None
        self.log(f"resumed from {checkpoint} at step {self.step} (epoch {self.epoch}, batch {self.batches_in_epoch})")
        return True

    def load_checkpoint(self, checkpoint: Path) -> None:
        state = load_state(checkpoint)
        set_state_dict(self.model, self.optimizer, model_state_dict=load_file(str(checkpoint / "model.safetensors")),
                       optim_state_dict=state["optimizer"], options=FULL_STATE)
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.skipped, self.records_seen = Counter(state["skipped"]), state["records_seen"]
        set_rng_state(state["rng"])
        pin_paths(state.get("kernel_paths", {}))

    # -- one step ---------------------------------------------------------
    def autocast(self):
        if resolve_precision(self.config.precision, self.device) == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def set_lr(self) -> float:
        c = self.config
        lr = warmup_cosine(self.step, c.warmup_steps, c.max_steps, c.lr, c.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def record_counts(self) -> tuple[int, dict[str, int]]:
        """(records seen, skipped by kind) summed over all ranks (a collective: call on every rank)."""
        seen, skipped = 0, Counter()
        for rank_seen, rank_skipped in all_gather_objects((self.records_seen, dict(self.skipped))):
            seen += rank_seen
            skipped.update(rank_skipped)
        return seen, dict(skipped)

    def check_bad_fraction(self, seen: int, skipped: dict[str, int]) -> None:
        """Stop the run when bad records pass `max_bad_fraction` (counts from `record_counts`)."""
        bad = sum(skipped.values())
        if bad + seen >= MIN_RECORDS_FOR_BAD_FRACTION and bad / (bad + seen) > self.config.max_bad_fraction:
            raise TrainingError(f"{bad} of {bad + seen} records were bad ({describe_skipped(skipped)}), more than "
                                f"trainer.max_bad_fraction={self.config.max_bad_fraction}; fix the data or raise it")

    def guard_nonfinite(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every rank. A non-finite one skips the step, is logged,
        and `max_nonfinite` in a row stop the run (the last good checkpoint stays as it was)."""
        if hasattr(loss, "full_tensor"):  # FSDP's gradient norm is a DTensor
            loss = loss.full_tensor()
        finite = all_reduce(torch.isfinite(loss.detach().float().cpu()).to(torch.int32), "min")
        if finite.item():
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
        """Train until `max_steps` or `max_minutes`, epoch after epoch; a summary of the run."""
        c = self.config
        self.open_logs()
        self.started = time.perf_counter()
        self.deadline = self.started + 60 * c.max_minutes if c.max_minutes else math.inf
        self.window_start, self.window_samples, self.last_loss, self.micro = time.perf_counter(), 0, float("nan"), 0
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        last = None  # (batch, outputs) of the last step, for the final picture
        try:
            done = self.step >= c.max_steps  # a finished run, resumed: nothing left to train
            while not done:
                done, last = self.run_epoch(batches(self.epoch, self.batches_in_epoch), last)
            if self.step % c.ckpt_every:  # the final state, unless that step was just saved
                self.save()
            if last is not None:
                self.save_picture(*last, "reconstruction.png")
        finally:
            self.close_logs()
        return self.summary()

    def run_epoch(self, batches: Iterable[Batch], last) -> tuple[bool, object]:
        """One pass over the epoch's batches; (whether training is done, the last step's batch and outputs)."""
        produced, usable, whole_epoch = 0, 0, self.batches_in_epoch == 0  # a resumed run starts mid-epoch
        for batch in batches:
            produced += 1
            self.batches_in_epoch += 1
            self.skipped.update(batch.skipped)
            self.records_seen += len(batch)
            if len(batch) == 0:  # a worker's last word: only skip counts
                continue
            usable += 1
            stepped, loss, parts, outputs = self.train_step(batch)
            if not stepped:
                continue
            last = (batch, outputs)
            if self.after_step(loss, parts, batch, outputs):
                return True, last
        if produced == 0:
            raise TrainingError("the data stream produced no batches: are the shards empty?")
        if whole_epoch and sum(all_gather_objects(usable)) == 0:  # every rank ends its epochs together
            self.stop_without_usable_records()
        self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        return False, last

    def stop_without_usable_records(self) -> None:
        """A whole epoch on every rank gave only skip reports: another epoch would give the same, forever."""
        seen, skipped = self.record_counts()
        raise no_usable_records("a whole epoch", seen, skipped)

    def train_step(self, batch: Batch):
        """Forward, backward and (every `accum_steps` micro-batches) an optimiser step;
        (whether the optimiser stepped, loss, loss parts, outputs)."""
        c = self.config
        self.lr = self.set_lr()
        with self.autocast():
            loss, parts, outputs = self.model(batch)
        if not self.guard_nonfinite(loss):
            self.micro = 0
            return False, loss, parts, outputs
        (loss / c.accum_steps).backward()
        self.micro += 1
        self.window_samples += len(batch)
        if self.micro < c.accum_steps:
            return False, loss, parts, outputs
        self.micro = 0
        if c.clip_grad:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
            if not self.guard_nonfinite(grad_norm):
                return False, loss, parts, outputs
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bar.update(1)
        return True, loss, parts, outputs

    def after_step(self, loss, parts: dict, batch: Batch, outputs) -> bool:
        """Log, draw and checkpoint on their schedules; True when training is done."""
        c = self.config
        if self.step % c.log_every == 0 or self.step == c.max_steps:
            self.log_metrics(loss, parts)
        if self.step % c.picture_every == 0:
            self.save_picture(batch, outputs, f"pictures/step-{self.step:06d}.png")
        if self.step % c.ckpt_every == 0:
            self.save()
        out_of_time = all_reduce(torch.tensor(int(time.perf_counter() > self.deadline)), "max").item()
        return self.step >= c.max_steps or bool(out_of_time)

    def open_logs(self) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        main = self.context.is_main
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a") if main else None
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard")) if main else None
        self.bar = tqdm(total=self.config.max_steps, initial=self.step, desc="pretrain", unit="step",
                        dynamic_ncols=True, disable=not main)

    def close_logs(self) -> None:
        self.bar.close()
        if self.context.is_main:
            self.writer.close()
            self.metrics_file.close()

    def log_metrics(self, loss: torch.Tensor, parts: dict) -> None:
        """Loss and its parts averaged over ranks, samples/s summed over ranks, to the
        metrics file, TensorBoard and the progress bar (a collective: every rank calls it)."""
        reduced = all_reduce(torch.stack([loss.detach().float().cpu(),
                                          *[v.detach().float().cpu() for v in parts.values()]]), "mean")
        self.last_loss = reduced[0].item()
        now = time.perf_counter()
        rate = all_reduce(torch.tensor(self.window_samples / max(now - self.window_start, 1e-9)), "sum")
        self.window_start, self.window_samples = now, 0
        self.check_bad_fraction(*self.record_counts())
        if not self.context.is_main:
            return
        record = {"step": self.step, "loss": self.last_loss, "lr": self.lr, "samples_per_s": rate.item(),
                  "epoch": self.epoch, "elapsed_s": now - self.started,
                  # a term's loss as loss/<term>; what a term measures beside it as <term>/<measure>
                  **{k if "/" in k else f"loss/{k}": v.item() for k, v in zip(parts, reduced[1:])},
                  "skipped": sum(self.skipped.values())}
        with writing(self.run_dir / "metrics.jsonl",
                     lambda: f"the last intact checkpoint is {latest_checkpoint(self.run_dir)}"):
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        for key in ("loss", "lr", "samples_per_s", *(k for k in parts if "/" in k)):
            self.writer.add_scalar(f"train/{key}", record[key], self.step)
        self.bar.set_postfix(loss=f"{self.last_loss:.4f}", samples_s=f"{rate.item():.0f}", lr=f"{self.lr:.2e}")

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.started
        seen, skipped = self.record_counts()
        summary = {"steps": self.step, "final_loss": self.last_loss, "train_seconds": elapsed,
                   "records_seen": seen, "skipped": skipped, "nonfinite_steps": self.nonfinite_steps,
                   "world_size": self.context.world_size, **self.replica_check()}
        if skipped:
            self.log(f"skipped {sum(skipped.values())} bad records: {describe_skipped(skipped)}")
        self.check_bad_fraction(seen, skipped)
        return summary

    def replica_check(self) -> dict:
        """Every rank's step count and a digest of its parameters. Under DDP the replicas must be
        bitwise identical; if they are not, the run is broken and says so instead of saving a lie."""
        digest = hashlib.sha256()
        for name, param in sorted(self.model.named_parameters()):
            local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP shard
            digest.update(name.encode() + local.detach().float().cpu().numpy().tobytes())
        gathered = all_gather_objects((self.step, digest.hexdigest()))
        steps, digests = [g[0] for g in gathered], [g[1] for g in gathered]
        replicated = self.context.enabled and self.config.strategy == "ddp"
        if replicated and len(set(digests)) > 1:
            raise TrainingError(f"DDP replicas diverged: parameter digests differ across ranks ({digests})")
        return {"steps_per_rank": steps, "parameter_digests": digests}

    def save_picture(self, batch: Batch, outputs, name: str) -> None:
        """Rank 0 draws its batch (`picture_fn(batch, outputs)`, on the CPU) to run_dir/name."""
        if not self.context.is_main or self.picture_fn is None:
            return
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            picture = self.picture_fn(batch.to("cpu"), outputs.map(lambda t: t.detach().float().cpu()))
        with writing(path):
            picture.save(path)
