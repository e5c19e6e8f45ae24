"""CPU fast paths for the two ops a ViT spends its time in: linear layers and attention.

Both compute exactly what `F.linear` and `F.scaled_dot_product_attention`
compute (same maths, same dtypes as under autocast); they only pick faster
kernels on CPU, where PyTorch's defaults leave a lot on the table:

- `linear`: fp32 matmuls go to MKL, which on AMD CPUs runs its AVX2 code
  (about half of AVX-512 speed); oneDNN, which PyTorch already ships and
  uses for bf16, runs AVX-512 on any vendor. Here forward, input-gradient
  and weight-gradient matmuls all go through oneDNN (bias fused in forward).
  Under CPU autocast the layer runs in the autocast dtype, as `nn.Linear` would.
  Where oneDNN cannot build the primitive for a dtype (bf16 on an AVX2-only
  CPU) the layer is plain `F.linear` (`onednn_linear_runs`).
- `attention`: PyTorch's CPU flash-attention kernel is slow for the short
  sequences of a masked autoencoder (tens to a few hundred tokens), worst in
  bf16 (about 4x slower than plain matmul-softmax-matmul at 50 tokens,
  2x at 197 with its backward). In bf16/fp16 on CPU attention is computed
  as matmul -> softmax -> matmul, in batch chunks whose score matrices fit
  in cache. In fp32, and on GPUs, SDPA is already the fastest.

`kernels="torch"` (ModelConfig.kernels) turns both fast paths off; under
`torch.compile` they step aside too (inductor makes its own choices).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

KERNELS = ("auto", "torch")
_FAST_DTYPES = (torch.float32, torch.bfloat16)
SCORE_CHUNK_BYTES = 3 << 20  # per attention chunk: the [b, heads, n, n] scores stay in L2/L3


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


def linear(x: Tensor, layer: nn.Linear, kernels: str = "auto") -> Tensor:
    """`layer(x)`, through oneDNN on CPU in fp32 and bf16 (autocast respected)."""
    if (kernels != "auto" or _PW is None or x.device.type != "cpu" or not isinstance(layer, nn.Linear)
            or torch.compiler.is_compiling()):  # inductor cannot lower the oneDNN op on unpacked weights
        return layer(x)
    dtype = _compute_dtype(x)
    if (dtype not in _FAST_DTYPES or layer.weight.dtype not in _FAST_DTYPES or x.numel() == 0
            or not onednn_linear_runs(dtype)):
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


def self_attention(qkv: Tensor, mask: Tensor | None = None, kernels: str = "auto") -> Tensor:
    """Multi-head self-attention from a fused projection `qkv` [B, N, 3, heads, d] -> [B, N, heads*d].

    On CPU in bf16/fp16 (a bool key-padding `mask` [B, 1, 1, N] or none) it runs the chunked
    kernel above; otherwise SDPA (which is the faster one in fp32 and on GPUs)."""
    b, n, _, h, d = qkv.shape
    fast = (kernels == "auto" and qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_compiling()
            and (mask is None or (mask.dtype == torch.bool and tuple(mask.shape) == (b, 1, 1, n))))
    if fast:
        chunk = max(1, SCORE_CHUNK_BYTES // (h * n * n * qkv.element_size()))
        return _ChunkedSelfAttention.apply(qkv, mask, chunk)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    return attention(q, k, v, mask, kernels).transpose(1, 2).reshape(b, n, h * d)
