"""The CPU fast paths in shared/kernels.py compute what F.linear and SDPA compute: values and gradients."""
from __future__ import annotations

import json
import time

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


@pytest.mark.parametrize("path", ["torch", "onednn"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_nn_linear_in_fp32(bias, path, forced_path):
    forced_path(path)
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


@pytest.fixture
def forced_path(monkeypatch):
    """force(path): every op takes `path` (no measurement), in a fresh cache of choices."""
    monkeypatch.setattr(kernels, "_CHOSEN", {})

    def force(path: str) -> None:
        monkeypatch.setattr(kernels, "choose", lambda key, make_paths: kernels._CHOSEN.setdefault(key, path))

    return force


@pytest.mark.parametrize("path", ["sdpa", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_mask", [False, True])
def test_self_attention_from_fused_qkv_matches_sdpa(path, dtype, with_mask, monkeypatch, forced_path):
    forced_path(path)
    monkeypatch.setattr(kernels, "SCORE_CHUNK_BYTES", 1 << 16)  # several batch chunks in the chunked kernel
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


# -- choosing paths -----------------------------------------------------------------------------------

INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
"""
AMD_AVX512 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni
"""
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma f16c
"""


@pytest.mark.parametrize("text, amx, avx512_bf16, precision", [
    (INTEL_AMX, True, True, "bf16"), (AMD_AVX512, False, True, "bf16"), (AVX2_ONLY, False, False, "fp32")])
def test_precision_auto_follows_the_cpu_flags_not_its_vendor(text, amx, avx512_bf16, precision, monkeypatch):
    from polymae.shared import trainer

    features = kernels.parse_cpuinfo(text)
    assert (features.amx, features.avx512_bf16) == (amx, avx512_bf16)
    assert features.model.startswith(("Intel", "AMD"))
    monkeypatch.setattr(trainer, "cpu_features", lambda: features)
    monkeypatch.setattr(trainer, "bf16_is_faster", lambda device_type: pytest.fail("flags decide: no measuring"))
    assert trainer.resolve_precision("auto", torch.device("cpu")) == precision
    assert trainer.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_precision_auto_measures_where_the_flags_are_unknown(monkeypatch):
    from polymae.shared import trainer

    monkeypatch.setattr(trainer, "cpu_features", lambda: kernels.CpuFeatures("unknown CPU", frozenset()))
    monkeypatch.setattr(trainer, "bf16_is_faster", lambda device_type: True)
    assert trainer.resolve_precision("auto", torch.device("cpu")) == "bf16"


def test_choose_takes_the_faster_path_once_keeps_it_for_later_runs_and_keeps_pinned_choices(
        monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    calls = []

    def paths(first_sleep, second_sleep):
        def make():
            calls.append("built")
            return {"first": lambda: time.sleep(first_sleep), "second": lambda: time.sleep(second_sleep)}
        return make

    assert kernels.choose("slow second", paths(0.0, 0.01)) == "first"
    assert kernels.choose("fast second", paths(0.01, 0.0)) == "second"
    assert kernels.choose("fast second", paths(0.0, 0.01)) == "second"  # cached: not measured again
    assert len(calls) == 2
    kernels.pin_paths({"pinned": "first"})
    assert kernels.choose("pinned", paths(0.01, 0.0)) == "first"
    assert kernels.chosen_paths() == {"slow second": "first", "fast second": "second", "pinned": "first"}

    # a later process on this machine reads the measured choices instead of measuring again
    assert kernels.measurements_file().parent == tmp_path / "polymae"
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    assert kernels.choose("fast second", paths(0.0, 0.01)) == "second"
    assert kernels.choose("slow second", paths(0.01, 0.0)) == "first"
    assert len(calls) == 2
    kernels.measurements_file().write_text("{not json")  # damaged: measured again and rewritten
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    assert kernels.choose("fast second", paths(0.0, 0.01)) == "first"
    assert len(calls) == 3 and json.loads(kernels.measurements_file().read_text()) == {"fast second": "first"}


def test_measuring_leaves_the_random_stream_and_grad_mode_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "_CHOSEN", {})
    layer = nn.Linear(32, 48)
    x = torch.randn(20, 32)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with torch.inference_mode():
        y = linear(x, layer)  # measures both paths (with gradients) on first use
    assert not y.requires_grad
    assert torch.equal(torch.rand(3), expected)
    assert any(key.startswith("linear float32 32x32->48") for key in kernels.chosen_paths())
