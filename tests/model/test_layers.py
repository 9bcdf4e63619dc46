"""The CPU low-precision matmul policy of dsv2.model.layers against float64 re-computations: one-row
GEMVs in bf16, multi-row inference GEMMs on a cached pre-packed fp32 copy that follows weight updates,
and training GEMMs that upcast on the fly so gradients reach the stored weight."""

from __future__ import annotations

import pytest
import torch

from dsv2.model.layers import Linear, native_low_precision


def ref(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    b = None if lin.bias is None else lin.bias.double()
    return torch.nn.functional.linear(x.double(), lin.weight.double(), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 1, 96), (2, 37, 96), (130, 96)])
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


def test_packed_copy_follows_weight_updates() -> None:
    lin = Linear(64, 48, bias=False, dtype=torch.bfloat16)
    x = torch.randn(5, 64).bfloat16()
    with torch.inference_mode():
        lin(x)
    packed = not native_low_precision(torch.device("cpu"), torch.bfloat16)
    assert hasattr(lin, "_fp32_packed") == packed  # the cache exists only where bf16 is emulated
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
    x = torch.randn(5, 64).bfloat16()
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
