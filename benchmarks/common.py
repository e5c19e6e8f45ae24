"""What the benchmarks share: the machine, the matmul limit, real photos, timing.

Benchmarks are plain scripts (not tests). Each has `main(argv) -> dict` so
`run_all.py` can run it in-process and collect its figures, and prints its
figures and a one-line verdict when run alone.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from polymae.shared.memory import reuse_freed_memory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# as the trainer and the data loader do: every contender in the process gets it (shared/memory.py)
reuse_freed_memory()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "colorwheel", "camera", "coins", "brick", "grass", "gravel", "moon")


def set_threads(value: str | int | None) -> str:
    """Intra-op threads for a benchmark: a number, or "auto": every core on a quiet machine, one
    thread when other jobs already keep the cores busy (1-minute load >= cores), where two threads
    lose most of their time waiting for each other at every op. Returns why, for the printout."""
    cores = os.cpu_count() or 1
    if value in (None, ""):
        return f"{torch.get_num_threads()} threads (torch default)"
    if str(value) == "auto":
        load = os.getloadavg()[0]
        if load >= cores and cores > 1:
            torch.set_num_threads(1)
            return f"1 thread (auto: load {load:.1f} on {cores} cores)"
        torch.set_num_threads(cores)
        return f"{cores} threads (auto: load {load:.1f} on {cores} cores)"
    torch.set_num_threads(int(value))
    return f"{int(value)} threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg_1min": round(os.getloadavg()[0], 2),
            "isa": torch.backends.cpu.get_cpu_capability()}


def matmul_gflops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` n^3 matmuls, in GFLOP/s: the matmul limit this process can reach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def photo_batch(batch: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """`batch` random crops of scikit-image's bundled photos, resized to size x size and
    ImageNet-normalised: [batch, 3, size, size] float."""
    from skimage import data

    g = torch.Generator().manual_seed(seed)
    photos = []
    for name in PHOTOS:
        array = torch.from_numpy(getattr(data, name)())
        if array.ndim == 2:
            array = array[..., None].expand(-1, -1, 3)
        photos.append(array[..., :3].permute(2, 0, 1).float() / 255)
    out = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        h, w = photo.shape[-2:]
        side = int(min(h, w) * (0.4 + 0.6 * float(torch.rand((), generator=g))))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = photo[None, :, top:top + side, left:left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (torch.stack(out) - mean) / std


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def adamw(params, fused: bool, **kwargs) -> torch.optim.AdamW:
    """AdamW; `fused=True` uses the single-kernel implementation where this torch has it on CPU."""
    options = {"lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05, **kwargs}
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **options)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, **options)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Budget:
    """Alternate timed calls until `seconds` are spent (at least `min_rounds`, at most `max_rounds`)."""

    def __init__(self, seconds: float, min_rounds: int, max_rounds: int):
        self.seconds, self.min_rounds, self.max_rounds = seconds, min_rounds, max_rounds
        self.start = time.perf_counter()
        self.rounds = 0

    def more(self) -> bool:
        if self.rounds >= self.max_rounds:
            return False
        if self.rounds < self.min_rounds:
            self.rounds += 1
            return True
        if time.perf_counter() - self.start > self.seconds:
            return False
        self.rounds += 1
        return True


def timed_step(optimizer, forward, precision: str) -> dict:
    """One training step, forward (under `precision`'s autocast) + backward + optimizer, timed phase by phase."""
    t0, c0 = time.perf_counter(), time.process_time()
    with autocast(precision):
        loss = forward()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"loss": loss.item(), "step_s": t3 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1,
            "optimizer_s": t3 - t2, "cpu_s": time.process_time() - c0}
