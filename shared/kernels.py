"""CPU fast paths for the two ops a ViT spends its time in: linear layers and attention.

Each op has two paths that compute the same maths (same dtypes as under autocast):

- `linear`: torch's own (`F.linear`: MKL in fp32, oneDNN in bf16) or oneDNN for the
  forward, input-gradient and weight-gradient matmuls (bias fused in forward). Which
  is faster depends on the CPU, not on its vendor's name alone: on an AMD EPYC with
  AVX-512 MKL runs its AVX2 code and oneDNN wins fp32 by about 2x; on an Intel Xeon
  MKL wins fp32; on an AVX2-only CPU they are close and oneDNN has no bf16 at all
  (`onednn_linear_runs`).
- `self_attention`: SDPA (torch's flash kernel) or a chunked matmul -> softmax ->
  matmul whose score matrices stay in cache. SDPA's CPU kernel is slow for the short
  sequences of a masked autoencoder (tens of tokens), worst in bf16 (about 4x slower
  at 50 tokens).

So each path is chosen per op shape by a short measurement at its first use (forward
and backward of both paths on the same shapes, private random numbers, best of a few),
held for the process (`chosen_paths`) and kept in a file per machine
(`measurements_file`), so that every later run here takes the same paths: the two round
differently, and two runs of one recipe on one machine are bitwise alike. A resumed run
pins the choices of the run it continues (`pin_paths`), wherever it resumes.
Whether bf16 is worth running at all is read from the CPU's flags (`cpu_features`).

`kernels="torch"` (ModelConfig.kernels) turns the choice off; under `torch.compile`
the ops are torch's too (inductor makes its own choices); off CPU they are torch's.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

KERNELS = ("auto", "torch")
_FAST_DTYPES = (torch.float32, torch.bfloat16)
SCORE_CHUNK_BYTES = 3 << 20  # per attention chunk: the [b, heads, n, n] scores stay in L2/L3


# -- what the CPU has ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU's model name and instruction-set flags, as /proc/cpuinfo lists them."""
    model: str
    flags: frozenset[str]

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def native_bf16(self) -> bool | None:
        """bf16 matmuls in hardware (AMX tiles or AVX-512 BF16 dot products); without either,
        torch emulates them about 20x slower than fp32. None where the flags are unknown."""
        if not self.flags:
            return None
        return self.amx or self.avx512_bf16


def parse_cpuinfo(text: str) -> CpuFeatures:
    """The first processor's `model name` and `flags` lines of /proc/cpuinfo's text."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return CpuFeatures(fields.get("model name", "unknown CPU"), frozenset(fields.get("flags", "").split()))


@functools.cache
def cpu_features() -> CpuFeatures:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no flags, so the choices that need them are measured instead
        import platform
        return CpuFeatures(platform.processor() or "unknown CPU", frozenset())


# -- choosing a path by measuring it ------------------------------------------------------------------

_CHOSEN: dict[str, str] = {}
SWITCH_MARGIN = 0.9  # the second path is taken only when it needs at most 90% of the first one's time


def chosen_paths() -> dict[str, str]:
    """{op shape: path} for every op measured (or pinned) in this process."""
    return dict(_CHOSEN)


def pin_paths(paths: dict[str, str]) -> None:
    """Take these choices instead of measuring (a resumed run continues with its own paths)."""
    _CHOSEN.update(paths)


def measurements_file() -> Path:
    """Where this machine's measured choices are kept (per CPU model and flags, torch version and
    thread count), so that every run of a recipe here takes the same paths and rounds the same way,
    and no process measures an op shape that an earlier one did."""
    cpu = cpu_features()
    machine = f"{cpu.model}|{' '.join(sorted(cpu.flags))}|{torch.__version__}|{torch.get_num_threads()} threads"
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "polymae" / f"kernel-paths-{hashlib.sha256(machine.encode()).hexdigest()[:16]}.json"


def _read_measurements(path: Path) -> dict[str, str]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: measure again (and rewrite it)
        return {}
    return {k: v for k, v in stored.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(stored, dict) else {}


def _remember(key: str, path_name: str) -> None:
    path = measurements_file()
    stored = {**_read_measurements(path), key: path_name}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(stored, indent=1, sort_keys=True))
        os.replace(temporary, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:  # a read-only or full home: the choice still holds for this process
        pass


def _seconds(run: Callable[[], None], repeats: int = 3) -> float:
    run()  # warm-up: allocations, oneDNN primitive creation
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def choose(key: str, make_paths: Callable[[], dict[str, Callable[[], None]]]) -> str:
    """The faster of two paths for op shape `key` (the first, torch's own, unless the second is
    clearly faster): pinned, else as measured earlier on this machine (`measurements_file`), else
    measured now. `make_paths` builds both runs on their own inputs; they run with gradients (also
    when the caller is in no-grad or inference mode), outside autocast, and without touching the
    global random state."""
    if key not in _CHOSEN:
        known = _read_measurements(measurements_file()).get(key)
        if known is None:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
                (first, run_first), (second, run_second) = make_paths().items()
                known = second if _seconds(run_second) < SWITCH_MARGIN * _seconds(run_first) else first
            _remember(key, known)
        _CHOSEN[key] = known
    return _CHOSEN[key]


def _bucket(size: int) -> int:
    """Rows rounded up to a power of two: batches of nearby sizes share one measurement."""
    return 1 << max(0, size - 1).bit_length()


MEASURE_FLOPS = 2e9  # at most this much work per timed run of a path: a measurement costs well under a second


def _measured(rows: int, flops_per_row: float) -> int:
    """How many of `rows` to time: all of them, or as many as MEASURE_FLOPS allows (at least 8)."""
    return max(8, min(rows, int(MEASURE_FLOPS // max(1.0, flops_per_row))))


def _random(*shape: int, dtype: torch.dtype, grad: bool = False) -> Tensor:
    generator = torch.Generator().manual_seed(0)  # a private generator: training's random stream is untouched
    return torch.randn(*shape, generator=generator).to(dtype).requires_grad_(grad)


def _onednn_linear_op():
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_PW = _onednn_linear_op()


@functools.cache
def onednn_linear_runs(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN's inner-product primitive for `dtype`: bf16 needs AVX-512
    (an AVX2-only CPU refuses to create it), so it is tried once, not assumed from the vendor."""
    if _PW is None:
        return False
    try:
        _PW(torch.ones(2, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype), None, "none", [], "")
    except RuntimeError:
        return False
    return True


def _mm(a: Tensor, b_t: Tensor) -> Tensor:
    """a [M, K] @ b_t.T (b_t [N, K], any strides) -> [M, N] through oneDNN."""
    return _PW(a, b_t, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with every matmul (forward and both gradients) in oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _PW(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        fp32 = dy.dtype == torch.float32  # bf16 matmuls already use oneDNN through aten::mm
        if ctx.needs_input_grad[0]:
            dx = _mm(dy, weight.t()) if fp32 else torch.mm(dy, weight)
        if ctx.needs_input_grad[1]:
            dw = _mm(dy.t(), x.t()) if fp32 else torch.mm(dy.t(), x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def _linear_path(rows: int, layer: nn.Linear, dtype: torch.dtype) -> str:
    """'torch' or 'onednn' for a [rows, in] x [out, in] linear in `dtype`, measured once per shape."""
    out_features, in_features = layer.weight.shape
    rows = _bucket(rows)
    key = f"linear {str(dtype).removeprefix('torch.')} {rows}x{in_features}->{out_features}"
    if key in _CHOSEN:
        return _CHOSEN[key]

    def paths():
        rows_timed = _measured(rows, 6 * in_features * out_features)
        x = _random(rows_timed, in_features, dtype=dtype, grad=True)
        weight = _random(out_features, in_features, dtype=dtype, grad=True)
        bias = None if layer.bias is None else _random(out_features, dtype=dtype, grad=True)
        dy = _random(rows_timed, out_features, dtype=dtype)
        return {"torch": lambda: F.linear(x, weight, bias).backward(dy),
                "onednn": lambda: _OneDNNLinear.apply(x, weight, bias).backward(dy)}

    return choose(key, paths)


def linear(x: Tensor, layer: nn.Linear, kernels: str = "auto") -> Tensor:
    """`layer(x)`, on CPU through whichever of torch's and oneDNN's linear is faster for its shape
    and dtype here (autocast respected)."""
    if (kernels != "auto" or _PW is None or x.device.type != "cpu" or not isinstance(layer, nn.Linear)
            or torch.compiler.is_compiling()):  # inductor cannot lower the oneDNN op on unpacked weights
        return layer(x)
    dtype = _compute_dtype(x)
    if (dtype not in _FAST_DTYPES or layer.weight.dtype not in _FAST_DTYPES or x.numel() == 0
            or not onednn_linear_runs(dtype)):
        return layer(x)
    rows = x.numel() // x.shape[-1]
    if _linear_path(rows, layer, dtype) == "torch":
        return layer(x)
    weight = layer.weight.to(dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    lead = x.shape[:-1]
    with torch.autocast("cpu", enabled=False):
        y = _OneDNNLinear.apply(x.to(dtype).reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*lead, y.shape[-1])


def _math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:  # an additive float mask, as SDPA takes it
        scores = scores + mask.to(scores.dtype)
    return torch.matmul(scores.softmax(-1), v)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, kernels: str = "auto") -> Tensor:
    """Softmax attention over q, k, v [B, heads, N, d]; `mask` as SDPA takes it: bool (True = attend)
    or additive float, broadcastable to [B, heads, N, N] (the model passes bool [B, 1, 1, N])."""
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    if kernels != "auto" or q.device.type != "cpu" or not low_precision or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, heads, n, _ = q.shape
    chunk = max(1, SCORE_CHUNK_BYTES // (heads * n * k.shape[-2] * q.element_size()))
    if chunk >= b:
        return _math_attention(q, k, v, mask)
    per_sample_mask = mask is not None and mask.shape[0] == b
    parts = [_math_attention(q[i:i + chunk], k[i:i + chunk], v[i:i + chunk],
                             mask[i:i + chunk] if per_sample_mask else mask) for i in range(0, b, chunk)]
    return torch.cat(parts)


def _heads(part: Tensor, which: int) -> Tensor:
    """[c, N, 3, H, d] -> q, k or v as [c*H, N, d] (contiguous, for bmm)."""
    c, n, _, h, d = part.shape
    return part[:, :, which].transpose(1, 2).reshape(c * h, n, d)


class _ChunkedSelfAttention(torch.autograd.Function):
    """Self-attention straight from a fused qkv projection [B, N, 3, H, d] to [B, N, H*d]:
    per batch chunk, scores = q k^T / sqrt(d) (one baddbmm), an optional key-padding
    mask, softmax, @ v, written into the output in token-major order. Backward
    recomputes the head layouts from qkv and reuses the saved probabilities."""

    @staticmethod
    def forward(ctx, qkv: Tensor, mask: Tensor | None, chunk: int) -> Tensor:
        b, n, _, h, d = qkv.shape
        scale = d ** -0.5
        out = qkv.new_empty(b, n, h, d)
        probs = []
        for i in range(0, b, chunk):
            part = qkv[i:i + chunk]
            c = part.shape[0]
            q, k, v = (_heads(part, j) for j in range(3))
            scores = torch.baddbmm(q.new_empty(c * h, n, n), q, k.transpose(1, 2), beta=0, alpha=scale)
            if mask is not None:
                keep = mask[i:i + c].expand(c, h, 1, n).reshape(c * h, 1, n)
                scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
            p = torch.softmax(scores, -1)
            out[i:i + c] = torch.bmm(p, v).view(c, h, n, d).transpose(1, 2)
            probs.append(p)
        ctx.save_for_backward(qkv, *probs)
        ctx.chunk, ctx.scale = chunk, scale
        return out.view(b, n, h * d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        qkv, *probs = ctx.saved_tensors
        b, n, _, h, d = qkv.shape
        grad = grad.view(b, n, h, d)
        dqkv = torch.empty_like(qkv)
        for p, i in zip(probs, range(0, b, ctx.chunk)):
            part = qkv[i:i + ctx.chunk]
            c = part.shape[0]
            q, k, v = (_heads(part, j) for j in range(3))
            do = grad[i:i + c].transpose(1, 2).reshape(c * h, n, d)
            dv = torch.bmm(p.transpose(1, 2), do)
            ds = torch._softmax_backward_data(torch.bmm(do, v.transpose(1, 2)), p, -1, p.dtype)
            dq = torch.bmm(ds, k).mul_(ctx.scale)
            dk = torch.bmm(ds.transpose(1, 2), q).mul_(ctx.scale)
            for j, g in enumerate((dq, dk, dv)):
                dqkv[i:i + c, :, j] = g.view(c, h, n, d).transpose(1, 2)
        return dqkv, None, None


def _sdpa_self_attention(qkv: Tensor, mask: Tensor | None, kernels: str) -> Tensor:
    b, n, _, h, d = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return attention(q, k, v, mask, kernels).transpose(1, 2).reshape(b, n, h * d)


def _chunked_self_attention(qkv: Tensor, mask: Tensor | None) -> Tensor:
    _, n, _, h, _ = qkv.shape
    chunk = max(1, SCORE_CHUNK_BYTES // (h * n * n * qkv.element_size()))
    return _ChunkedSelfAttention.apply(qkv, mask, chunk)


def _self_attention_path(qkv: Tensor, masked: bool) -> str:
    """'sdpa' or 'chunked' for self-attention of this shape and dtype, measured once per shape."""
    b, n, _, h, d = qkv.shape
    b = _bucket(b)
    key = f"self_attention {str(qkv.dtype).removeprefix('torch.')} {b}x{h}x{n}x{d}{' masked' if masked else ''}"
    if key in _CHOSEN:
        return _CHOSEN[key]

    def paths():
        samples = _measured(b, 12 * h * n * n * d)
        probe = _random(samples, n, 3, h, d, dtype=qkv.dtype, grad=True)
        mask = torch.ones(samples, 1, 1, n, dtype=torch.bool) if masked else None
        grad = _random(samples, n, h * d, dtype=qkv.dtype)
        return {"sdpa": lambda: _sdpa_self_attention(probe, mask, "torch").backward(grad),
                "chunked": lambda: _chunked_self_attention(probe, mask).backward(grad)}

    return choose(key, paths)


def self_attention(qkv: Tensor, mask: Tensor | None = None, kernels: str = "auto") -> Tensor:
    """Multi-head self-attention from a fused projection `qkv` [B, N, 3, heads, d] -> [B, N, heads*d].

    On CPU (fp32, bf16 or fp16; a bool key-padding `mask` [B, 1, 1, N] or none) the faster of
    SDPA and the chunked kernel above for this shape; otherwise SDPA."""
    b, n, _, h, d = qkv.shape
    eligible = (kernels == "auto" and qkv.device.type == "cpu"
                and qkv.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not torch.compiler.is_compiling()
                and (mask is None or (mask.dtype == torch.bool and tuple(mask.shape) == (b, 1, 1, n))))
    if not eligible:
        return _sdpa_self_attention(qkv, mask, kernels)
    if _self_attention_path(qkv, mask is not None) == "chunked":
        return _chunked_self_attention(qkv, mask)
    return _sdpa_self_attention(qkv, mask, "torch")
