"""The CPU low-precision policy (dsv2.precision, swapped in by `prepare`) against float64 re-computations: one-row
GEMVs in bf16, multi-row inference GEMMs through dsv2's C GEMM on the bf16 weight as stored, or else on a cached
pre-packed fp32 copy that follows weight updates, and training GEMMs that upcast on the fly so gradients reach
the stored weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv2.precision import UPCAST_GEMV_ROWS, native_low_precision, prepare
from dsv2.precision import CpuLinear as Linear

ROWS = UPCAST_GEMV_ROWS + 4  # more rows than the C GEMV takes: the packed copy's GEMM where bf16 is emulated


def ref(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    b = None if lin.bias is None else lin.bias.double()
    return torch.nn.functional.linear(x.double(), lin.weight.double(), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 1, 96), (UPCAST_GEMV_ROWS, 96), (2, 37, 96), (130, 96)])
def test_linear_inference_matches_float64(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    lin = Linear(96, 80, bias=True, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g) / 10)
        lin.bias.copy_(torch.randn(80, generator=g))
    x = torch.randn(*shape, generator=g).to(dtype)
    with torch.inference_mode():
        y = lin(x)
    assert y.shape == (*shape[:-1], 80) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output rounding
    torch.testing.assert_close(y.double(), ref(x, lin), rtol=tol, atol=tol)


def _c_gemm_here() -> bool:
    from dsv2.quant import native

    lib = native.library()
    return lib is not None and native.gemm_kind(lib) == 2


def test_packed_copy_follows_weight_updates() -> None:
    lin = Linear(64, 48, bias=False, dtype=torch.bfloat16)
    x = torch.randn(ROWS, 64).bfloat16()
    with torch.inference_mode():
        lin(x)
    packed = not native_low_precision(torch.device("cpu"), torch.bfloat16) and not _c_gemm_here()
    assert hasattr(lin, "_packed") == packed  # the cache exists only where bf16 is emulated without the C GEMM
    with torch.no_grad():
        lin.weight.mul_(-2)  # in-place update: the cached copy must be rebuilt
    with torch.inference_mode():
        y = lin(x)
    torch.testing.assert_close(y.double(), ref(x, lin), rtol=2e-2, atol=2e-2)


def test_training_grads_reach_the_bf16_weight() -> None:
    lin = Linear(32, 16, bias=False, dtype=torch.bfloat16)
    x = torch.randn(4, 32).bfloat16()
    lin(x).float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.bfloat16
    want = x.double().sum(0).expand(16, 32)  # d(sum(x W^T))/dW = 1 x
    torch.testing.assert_close(lin.weight.grad.double(), want, rtol=2e-2, atol=2e-2)


def test_cached_copies_survive_deepcopy_pickle_and_moves() -> None:
    import copy
    import io

    lin = Linear(64, 48, bias=False, dtype=torch.bfloat16)
    x = torch.randn(ROWS, 64).bfloat16()
    with torch.inference_mode():
        want = lin(x)
    twin = copy.deepcopy(lin)  # a packed oneDNN copy has no storage: it must not be copied
    torch.save(lin, io.BytesIO())
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), want)
    lin.float()  # a cast makes every cached copy stale
    assert not any(hasattr(lin, c) for c in Linear.CACHES)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x.float()).double(), ref(x.float(), lin), rtol=1e-5, atol=1e-5)


def test_prepare_swaps_plain_modules_only_and_keeps_the_state_dict() -> None:
    from dsv2.config import ModelConfig
    from dsv2.model import DeepseekV2, Experts
    from dsv2.precision import CpuExperts

    model = DeepseekV2(ModelConfig.from_preset("tiny"), dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.inference_mode():
        want = model(ids)
    keys = list(model.state_dict())

    class Special(nn.Linear):  # e.g. a quantised module: not a plain nn.Linear, left alone
        pass

    model.layers[0].self_attn.o_proj.__class__ = Special
    assert prepare(model) is model and list(model.state_dict()) == keys
    swapped = True  # a bf16 model on the CPU: always (native bf16 too: one-row GEMVs take dsv2's C kernel)
    assert isinstance(model.lm_head, Linear) == swapped
    assert type(model.layers[0].self_attn.o_proj) is Special
    assert all(isinstance(m.experts, CpuExperts) == swapped for m in model.moe_layers())
    assert all(isinstance(m.experts, Experts) for m in model.moe_layers())
    with torch.inference_mode():
        got = model(ids)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)  # bf16 rounding of two orders


@pytest.mark.parametrize("route", ["C GEMM", "packed fp32 copy"])
def test_emulated_bf16_gemms_match_float64(route: str, monkeypatch) -> None:
    """Where bf16 is emulated (AVX2), prompt-sized GEMMs of linears and routed experts: dsv2's C GEMM on the
    bf16 weights as stored (no fp32 copy kept), or the packed fp32 copy / per-call fp32 copies without it;
    forced here on any machine (the C GEMM's vector path is in every AVX2 build of the library)."""
    from dsv2 import precision
    from dsv2.model.moe import Experts
    from dsv2.precision import CpuExperts
    from dsv2.quant import native

    lib = native.library()
    if route == "C GEMM" and lib is None:
        pytest.skip("no C compiler: the C kernels cannot be built here")
    monkeypatch.setitem(precision._NATIVE, torch.bfloat16, False)
    monkeypatch.setattr(native, "gemm_kind", lambda lib: 2 if route == "C GEMM" else 0)
    g = torch.Generator().manual_seed(5)
    lin = Linear(200, 70, bias=True, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(70, 200, generator=g) / 10)
        lin.bias.copy_(torch.randn(70, generator=g))
    x = torch.randn(2, 19, 200, generator=g).bfloat16()
    with torch.inference_mode():
        y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 19, 70)
    assert hasattr(lin, "_packed") == (route != "C GEMM")
    torch.testing.assert_close(y.double(), ref(x, lin), rtol=2e-2, atol=2e-2)

    ex = Experts(4, 48, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ex.__class__ = CpuExperts
    n = 24  # 24 tokens x 2 picks over 4 experts: every expert above GEMV_ROWS rows
    xe = torch.randn(n, 48, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(n)])
    wts = torch.rand(n, 2, generator=g)
    want = torch.zeros(n, 48, dtype=torch.float64)
    gp, up, dp = (t.double() for t in (ex.gate_proj, ex.up_proj, ex.down_proj))
    for t in range(n):
        for j in range(2):
            e = idx[t, j]
            h = torch.nn.functional.silu(gp[e] @ xe[t].double()) * (up[e] @ xe[t].double())
            want[t] += wts[t, j].double() * (dp[e] @ h)
    with torch.inference_mode():
        got = ex(xe, idx, wts)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max()


def test_norms_and_rope_run_one_c_call_in_inference_only(monkeypatch) -> None:
    """After `prepare`, a bf16 model's RMSNorms, MLA's RoPE and the MLPs' SwiGLU gating run as one C call each
    in CPU inference (the same results as the plain modules' PyTorch ops, up to the order of the norm's sum and
    the exp's last bit), and as the plain PyTorch ops with autograd on: gradients reach the norm weights."""
    from dsv2.config import ModelConfig
    from dsv2.model import DeepseekV2
    from dsv2.model.layers import MLP, RMSNorm
    from dsv2.precision import CpuMLP, CpuRMSNorm
    from dsv2.quant import native

    if native.library() is None:
        pytest.skip("no C compiler: the C kernels cannot be built here")
    torch.manual_seed(0)
    model = DeepseekV2(ModelConfig.from_preset("tiny"), dtype=torch.bfloat16)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.weight.data.uniform_(0.5, 1.5)
    ids = torch.randint(0, model.config.vocab_size, (1, 11))
    with torch.inference_mode():
        want = model(ids)
    prepare(model)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(type(m) is CpuRMSNorm for m in norms)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]  # dense layers and shared experts
    assert mlps and all(type(m) is CpuMLP for m in mlps)
    calls = {"rms_norm": 0, "rope": 0, "silu_mul": 0}

    def counting(name: str):
        kernel = getattr(native, name)

        def counted(*a):
            calls[name] += 1
            return kernel(*a)
        return counted
    for name in calls:
        monkeypatch.setattr(native, name, counting(name))
    with torch.inference_mode():
        got = model(ids)
    assert calls == {"rms_norm": len(norms), "rope": 2 * model.config.num_hidden_layers, "silu_mul": len(mlps)}
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)  # bf16: the sum's order
    calls.update(rms_norm=0, rope=0, silu_mul=0)
    model(ids).float().logsumexp(-1).sum().backward()
    assert calls == {"rms_norm": 0, "rope": 0, "silu_mul": 0}
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in norms)
