"""int8 / int4 linears and experts against a float64 recomputation from the integer codes and scales.

The reference never calls the kernels: it dequantises the codes with the documented convention
(int8: q·s; int4: (q - 8)·scale + zero per group) in float64 and multiplies. The kernels may only
differ by accumulation order and the rounding of their output to the activation dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv2.model.moe import Experts
from dsv2.quant import QuantError, QuantExperts, QuantLinear
from dsv2.quant.kernels import (
    INT4_DEQUANT_ROWS,
    INT8_DEQUANT_ROWS,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

GEN = torch.Generator().manual_seed(0)


def _w(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k, generator=GEN) * 0.05


def _x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=GEN).to(dtype)


def _tol(dtype: torch.dtype, y: torch.Tensor) -> float:
    # fp32: accumulation order only; bf16: one rounding of the output (2^-8 relative) plus the
    # bf16 rounding of the stored scales, which the reference reads back from the module
    return float(y.abs().max()) * (1e-5 if dtype == torch.float32 else 1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, INT8_DEQUANT_ROWS + 3])
def test_int8_linear_matches_float64_dequantised_reference(dtype: torch.dtype, m: int) -> None:
    w, b = _w(96, 64), torch.randn(96, generator=GEN)
    lin = torch.nn.Linear(64, 96)
    with torch.no_grad():
        lin.weight.copy_(w), lin.bias.copy_(b)
    q = QuantLinear.from_linear(lin, "int8", dtype=dtype)
    x = _x(m, 64, dtype)
    ref = x.double() @ (q.qweight.double() * q.scales.double()[:, None]).T + q.bias.double()
    y = q(x)
    assert y.dtype == dtype and y.shape == (m, 96)
    assert (y.double() - ref).abs().max() <= _tol(dtype, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, group", [(64, 128, 32), (96, 256, 64), (48, 256, 128), (40, 96, 64)])
def test_int4_linear_matches_float64_dequantised_reference(dtype: torch.dtype, n: int, k: int, group: int) -> None:
    """(40, 96, 64) needs padding on both sides: N to 48 rows, K to 128 columns."""
    w = _w(n, k)
    q, _, _ = quantize_int4(torch.cat((w, w[:, -1:].expand(n, -(-k // group) * group - k)), 1)
                                   if k % group else w, group)
    mod = QuantLinear.from_weight(w, None, "int4", group, dtype)
    # the module's stored scales/zeros are the reference's (rounded to dtype), rows beyond n are padding
    sz = mod.scales_and_zeros.double()  # (Kp/g, Np, 2)
    s, z = sz[..., 0].T[:n].repeat_interleave(group, 1), sz[..., 1].T[:n].repeat_interleave(group, 1)
    deq = (q[:n].double() - 8) * s + z  # (n, Kp)
    for m in (1, 5, 33, INT4_DEQUANT_ROWS + 5):  # kernel rows, and the dequantise + GEMM path
        x = _x(m, k, dtype)
        ref = F.pad(x.double(), (0, deq.shape[1] - k)) @ deq.T
        y = mod(x)
        assert y.dtype == dtype and y.shape == (m, n)
        assert (y.double() - ref).abs().max() <= _tol(dtype, ref), m


def test_quantisation_error_is_within_half_a_step() -> None:
    """Independent of the kernels: round-to-nearest codes reconstruct w to within scale/2."""
    w = _w(32, 256)
    q, s = quantize_int8(w)
    assert ((q.double() * s.double()[:, None] - w.double()).abs() <= s.double()[:, None] / 2 + 1e-7).all()
    q4, s4, z4 = quantize_int4(w, 64)
    deq = (q4.double() - 8) * s4.double().repeat_interleave(64, 1) + z4.double().repeat_interleave(64, 1)
    assert ((deq - w.double()).abs() <= s4.double().repeat_interleave(64, 1) / 2 + 1e-6).all()
    assert q4.min() >= 0 and q4.max() <= 15 and q.abs().max() == 127


@pytest.mark.parametrize("n", [1, 9])  # one-token decode takes its own path
@pytest.mark.parametrize("weights, group", [("int8", 128), ("int4", 32)])
def test_quantised_experts_match_float64_reference(weights: str, group: int, n: int) -> None:
    e, d, i, k = 6, 64, 96, 2
    ex = Experts(e, d, i)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.05, generator=GEN)
    qe = QuantExperts.from_experts(ex, weights, group, dtype=torch.float32)
    x = torch.randn(n, d, generator=GEN)
    idx = torch.stack([torch.randperm(e, generator=GEN)[:k] for _ in range(n)])  # (N,K) distinct experts
    wts = torch.rand(n, k, generator=GEN)
    keep = torch.rand(n, k, generator=GEN) > 0.3 if n > 1 else None
    gate, up, down = (t.double() for t in qe.dequantised())
    ref = torch.zeros(n, d, dtype=torch.float64)
    for t in range(n):
        for j in range(k):
            if keep is None or keep[t, j]:
                ei = idx[t, j]
                h = F.silu(gate[ei] @ x[t].double()) * (up[ei] @ x[t].double())
                ref[t] += wts[t, j].double() * (down[ei] @ h)
    y = qe(x, idx, wts, keep)
    assert (y.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    # and the dequantised weights are the float ones to within the format's step
    step = 1 / 127 if weights == "int8" else 1 / 15
    assert (gate - ex.gate_proj.double()).abs().max() <= step * ex.gate_proj.abs().max() * 1.01


def test_decode_reads_only_the_picked_experts() -> None:
    qe = QuantExperts(8, 64, 32, "int4", 32, torch.float32)
    qe.set_expert(0, *(torch.zeros(s) for s in ((32, 64), (32, 64), (64, 32))))  # shapes only matter
    per_expert = sum(getattr(qe, n)[0].nbytes for n in ("gate_up_qweight", "gate_up_scales_and_zeros",
                                                        "down_qweight", "down_scales_and_zeros"))
    qe(torch.randn(1, 64), torch.tensor([[3, 5]]), torch.ones(1, 2))
    assert qe.bytes_read == 2 * per_expert


def test_bad_requests_are_named() -> None:
    with pytest.raises(QuantError, match="weights must be one of"):
        QuantLinear(64, 64, "int3")
    with pytest.raises(QuantError, match=r"group_size must be one of \(32, 64, 128, 256\).*48"):
        QuantLinear(64, 64, "int4", group_size=48)
    with pytest.raises(QuantError, match=r"group_size=64 must divide in_features.*\(16, 96\)"):
        quantize_int4(torch.randn(16, 96), 64)
    q = QuantLinear(64, 32, "int8", dtype=torch.float32)
    with pytest.raises(QuantError, match=r"\(32, 48\).*\(32, 64\)"):
        q.set_weight(torch.randn(32, 48))
    qe = QuantExperts(4, 64, 32, "int8", dtype=torch.float32)
    with pytest.raises(QuantError, match=r"expert 1 down_proj.*\(32, 64\), expected \(64, 32\)"):
        qe.set_expert(1, torch.randn(32, 64), torch.randn(32, 64), torch.randn(32, 64))


@pytest.mark.parametrize("n, k", [(64, 64), (128, 96), (48, 64), (208, 256), (16, 32)])
def test_unpack_inverts_the_cpu_int4_packing(n: int, k: int) -> None:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=GEN)
    assert torch.equal(unpack_int4(pack_int4(q), n, k), q)


def test_dequantised_weight_is_what_the_kernel_multiplies_by() -> None:
    """QuantLinear.weight (unpacked in Python) against the kernel applied to the identity."""
    q = QuantLinear.from_weight(_w(80, 256), None, "int4", 64, torch.float32)
    eye = torch.eye(256)
    via_kernel = torch.cat([q(eye[i:i + 64]) for i in range(0, 256, 64)]).T  # (N,K); 64 rows: the kernel path
    assert torch.allclose(q.weight, via_kernel, atol=1e-6)
