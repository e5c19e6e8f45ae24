"""The CPU fast paths in shared/kernels.py compute what F.linear and SDPA compute: values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polymae.shared import kernels
from polymae.shared.kernels import attention, linear, self_attention


def grads_of(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    out.float().square().sum().backward()
    return out.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_nn_linear_in_fp32(bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(3, 7, 48, requires_grad=True)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    ours, our_grads = grads_of(lambda: linear(x, layer), *params)
    ref, ref_grads = grads_of(lambda: layer(x), *params)
    assert ours.shape == (3, 7, 80) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_linear_under_bf16_autocast_is_nn_linear_under_autocast():
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    x = torch.randn(2, 33, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, our_grads = grads_of(lambda: linear(x, layer), x, layer.weight, layer.bias)
        ref, ref_grads = grads_of(lambda: layer(x), x, layer.weight, layer.bias)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert [g.dtype for g in our_grads] == [torch.float32] * 3  # fp32 master weights get fp32 grads
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-2, rtol=1e-2)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=2e-2)


def test_linear_falls_back_where_it_has_no_fast_path():
    layer = nn.Linear(8, 4).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(linear(x, layer), layer(x))
    layer32 = nn.Linear(8, 4)
    x32 = torch.randn(5, 8)
    assert torch.equal(linear(x32, layer32, kernels="torch"), layer32(x32))
    assert linear(torch.randn(0, 8), layer32).shape == (0, 4)


def qkv(b, heads, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("n", [50, 197])
def test_bf16_attention_matches_sdpa(n, monkeypatch):
    monkeypatch.setattr(kernels, "SCORE_CHUNK_BYTES", 1 << 18)  # force several batch chunks
    q, k, v = qkv(5, 4, n, 32, torch.bfloat16)
    mask = torch.ones(5, 1, 1, n, dtype=torch.bool)
    mask[1, ..., n // 2:] = False
    mask[3, ..., :3] = False
    ours, our_grads = grads_of(lambda: attention(q, k, v, mask), q, k, v)
    qd, kd, vd = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_grads = grads_of(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask), qd, kd, vd)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), ref, atol=3e-2, rtol=3e-2)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=6e-2, rtol=5e-2)


def test_fp32_attention_is_sdpa():
    q, k, v = qkv(2, 3, 20, 16, torch.float32)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_mask", [False, True])
def test_self_attention_from_fused_qkv_matches_sdpa(dtype, with_mask, monkeypatch):
    monkeypatch.setattr(kernels, "SCORE_CHUNK_BYTES", 1 << 16)  # several batch chunks (bf16 path)
    b, n, heads, d = 5, 37, 4, 16
    qkv = torch.randn(b, n, 3, heads, d, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    mask = None
    if with_mask:
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        mask[0, ..., 20:] = False
        mask[4, ..., 1:9] = False
    ours, (our_grad,) = grads_of(lambda: self_attention(qkv, mask), qkv)
    ref_qkv = qkv.detach().double().requires_grad_()

    def reference():
        q, k, v = ref_qkv.permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, heads * d)

    ref, (ref_grad,) = grads_of(reference, ref_qkv)
    assert ours.shape == (b, n, heads * d) and ours.dtype == dtype
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(ours.double(), ref, **tol)
    torch.testing.assert_close(our_grad.double(), ref_grad, **{k: 2 * v for k, v in tol.items()})
