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
from dsv2.quant import QuantError, QuantExperts, QuantLinear, native
from dsv2.quant.kernels import (
    INT4_DEQUANT_ROWS,
    INT4_GEMV_ROWS,
    INT4_Q8_ROWS,
    INT8_DEQUANT_ROWS,
    INT8_Q8_ROWS,
    INT8_Q8_ROWS_AVX2,
    Q8_ROWS_AVX2,
    Int4Weight,
    aten_int4_layout,
    pack_int4,
    quantize_activations_q8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

GEN = torch.Generator().manual_seed(0)


def _cpu_has(*flags: str) -> bool:
    try:
        have = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return all(f in have for f in flags)


# the C kernels as built for this CPU, their AVX2 and portable (scalar) variants, and PyTorch's kernels
BUILDS = {"C": None, "C-avx2": "-mavx2 -mfma", "C-scalar": "", "torch": None}


@pytest.fixture(autouse=True, params=list(BUILDS))
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> str:
    """Every test here runs with each build of dsv2's C kernels this machine can run, and without them."""
    if request.param == "torch":
        monkeypatch.setenv("DSV2_NATIVE_KERNELS", "0")
    elif BUILDS[request.param] is not None:
        if request.param == "C-avx2" and not _cpu_has("avx2", "fma"):
            pytest.skip("this CPU cannot run the AVX2 build")
        monkeypatch.setenv("DSV2_CFLAGS", BUILDS[request.param])
    native.reset()
    if request.param != "torch" and native.library() is None:
        pytest.skip("no C compiler: the C kernels cannot be built here")
    yield "C" if request.param.startswith("C") else "torch"
    native.reset()


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
    for m in (1, 5, 33, INT4_DEQUANT_ROWS + 5, INT4_GEMV_ROWS + 3):  # kernel rows, the dequantise + GEMM path
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
def test_unpack_inverts_the_int4_packing(n: int, k: int) -> None:
    """pack_int4 / unpack_int4 round trip, and where aten's kernel reads dsv2's layout (PyTorch's AVX512
    kernels) aten packs the same bytes."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=GEN)
    packed = pack_int4(q)
    assert packed.shape == (n, k // 2) and torch.equal(unpack_int4(packed, n, k), q)
    if aten_int4_layout():
        assert torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), packed)


_OTHER_ISA = """
import torch
from dsv2.quant import QuantLinear, native
from dsv2.quant.kernels import aten_int4_layout
assert torch.backends.cpu.get_cpu_capability() == "{cap}"
g = torch.Generator().manual_seed(0)
w = torch.randn(208, 256, generator=g) * 0.05
x = torch.randn(40, 256, generator=g)
for dt in (torch.float32, torch.bfloat16):
    q = QuantLinear.from_weight(w, None, "int4", 64, dt)
    ref = x.double() @ q.weight.double().T  # the codes dequantised in Python
    for m in (1, 3, 40):
        err = (q(x[:m].to(dt)).double() - ref[:m]).abs().max() / ref.abs().max()
        assert err < (1e-5 if dt == torch.float32 else 1.6e-2), (dt, m, float(err))
print("aten layout", aten_int4_layout(), "C kernels", native.library() is not None)
"""


@pytest.mark.parametrize("cap", ["avx2", "default"])
def test_int4_is_right_where_aten_packs_another_layout(kernels: str, cap: str) -> None:
    """aten's int4 packing follows the CPU PyTorch runs on (AVX2 and the portable build pack 32-row blocks), so
    dsv2 packs its own layout and keeps int4 products away from aten's kernel where the two differ: under
    ATEN_CPU_CAPABILITY=avx2 / default, int4 linears (C kernels, or PyTorch alone) match the dequantised
    codes."""
    import os
    import subprocess
    import sys

    if cap == "avx2" and not _cpu_has("avx2", "fma"):
        pytest.skip("this CPU cannot run PyTorch's AVX2 kernels")
    if os.environ.get("DSV2_CFLAGS") == "" or (cap == "default" and "DSV2_CFLAGS" in os.environ):
        pytest.skip("covered by the other builds (a subprocess each: kept to the builds that differ)")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    out = subprocess.run([sys.executable, "-c", _OTHER_ISA.format(cap=cap.upper())], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_dequantised_weight_is_what_the_kernel_multiplies_by() -> None:
    """QuantLinear.weight (unpacked in Python) against the kernel applied to the identity."""
    q = QuantLinear.from_weight(_w(80, 256), None, "int4", 64, torch.float32)
    eye = torch.eye(256)
    via_kernel = torch.cat([q(eye[i:i + 64]) for i in range(0, 256, 64)]).T  # (N,K); 64 rows: the kernel path
    assert torch.allclose(q.weight, via_kernel, atol=1e-6)


# ---- the C kernels on their own, at the shapes where their code paths split ----------------------------
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_c_int8_gemv_and_dequant_match_float64(kernels: str, scale_dtype: torch.dtype) -> None:
    """Rows not a multiple of 4, columns not a multiple of the vector width, 1..9 activation rows."""
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    q, s = quantize_int8(_w(37, 104))
    s = s.to(scale_dtype)
    deq = q.double() * s.double()[:, None]
    for m in range(1, 10):
        x = _x(m, 104, torch.float32)
        ref = x.double() @ deq.T
        assert (native.int8_gemv(lib, x, q, s).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for dt in (torch.float32, torch.bfloat16):
        out = torch.full((20, 104), float("nan"), dtype=dt)
        native.int8_dequant(lib, q, s, 11, 31, out)
        # fp32: one rounding of q·s, as the reference's; bf16: that, then one more (may differ by an ulp)
        torch.testing.assert_close(out.double(), deq[11:31].to(dt).double(),
                                   rtol=0 if dt == torch.float32 else 8e-3, atol=0)


@pytest.mark.parametrize("n", [64, 80, 112, 176])  # whole 64-row blocks, and a last block of 16 / 48 rows
def test_c_int4_dequant_matches_float64(kernels: str, n: int) -> None:
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    for group, dt in ((32, torch.float32), (64, torch.bfloat16)):
        w4 = Int4Weight.quantize(_w(n, 192), group, dt)
        deq = w4.dequantize(torch.float64)  # the float64 reference of the stored codes and scales
        for out_dt in (torch.float32, torch.bfloat16):
            out = torch.full((n - 9, 192), float("nan"), dtype=out_dt)
            native.int4_dequant(lib, w4.packed, w4.scales_and_zeros, group, 5, n - 4, out)
            torch.testing.assert_close(out.double(), deq[5:n - 4].to(out_dt).double(),
                                       rtol=1e-6 if out_dt == torch.float32 else 8e-3, atol=1e-7)


@pytest.mark.parametrize("n, k", [(64, 128), (176, 256), (80, 64)])  # whole blocks; a last block of 48 / 16 rows
def test_c_int4_gemv_matches_float64(kernels: str, n: int, k: int) -> None:
    """dsv2_int4_gemv (its vector path where this build has one, else the plain loop) for 1..9 rows, against
    the float64 product with the stored codes and bf16 scales: the code sums are exact, so only fp32
    accumulation differs."""
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    for group in (32, 64) if k % 64 == 0 else (32,):
        w4 = Int4Weight.quantize(_w(n, k), group, torch.bfloat16)
        deq = w4.dequantize(torch.float64)
        for m in range(1, 10):
            x = _x(m, k, torch.bfloat16)
            ref = x.double() @ deq.T
            y = native.int4_gemv(lib, x, w4.packed, w4.scales_and_zeros, group)
            assert y.shape == (m, w4.packed.shape[0]) and y.dtype == torch.float32
            assert (y[:, :n].double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (group, m)
    with pytest.raises(TypeError, match="bf16 activations and scales"):
        native.int4_gemv(lib, x.float(), w4.packed, w4.scales_and_zeros, group)
    with pytest.raises(ValueError, match=f"activations have {k - 2} columns, the packed weight {k}"):
        native.int4_gemv(lib, x[:, 2:], w4.packed, w4.scales_and_zeros, group)


def test_c_int8_gemv_bf16_matches_float64(kernels: str) -> None:
    """dsv2_int8_gemv_bf16 (nibble dot products where the CPU has AVX512_BF16, else the widened fp32 loop):
    columns not a multiple of the 32-column step, 1..6 rows, fp32 and bf16 scales."""
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    q, s = quantize_int8(_w(37, 104))
    q[0, :8] = torch.tensor([-127, -128 + 1, -1, 0, 1, 15, 16, 127], dtype=torch.int8)  # nibble edge cases
    for scale in (s, s.bfloat16()):
        deq = q.double() * scale.double()[:, None]
        for m in range(1, 7):
            x = _x(m, 104, torch.bfloat16)
            ref = x.double() @ deq.T
            y = native.int8_gemv_bf16(lib, x, q, scale)
            assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), m
    with pytest.raises(TypeError, match="bf16 activations"):
        native.int8_gemv_bf16(lib, x.float(), q, s)


def test_c_bf16_batched_gemv_on_strided_heads(kernels: str) -> None:
    """dsv2_bf16_bgemv on per-head row blocks of one weight (MLA's W_UV: rows h*(Dn+Dv)+Dn.. of kv_b_proj),
    1..5 rows per head (5: a second tile of rows)."""
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    h, dn, dv, c = 3, 8, 12, 40
    w = _w(h * (dn + dv), c).bfloat16().view(h, dn + dv, c)[:, dn:]  # (H,Dv,C), rows strided
    for m, dt in [(m, dt) for m in range(1, 6) for dt in (torch.float32, torch.bfloat16)]:
        x = _x(h * m, c, dt).view(h, m, c)  # bf16 rows: the dot-product loop where the CPU has one
        ref = x.double() @ w.double().transpose(1, 2)
        y = native.bf16_bgemv(lib, x, w)
        assert y.shape == (h, m, dv)
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (m, dt)
    with pytest.raises(ValueError, match="contiguous weight rows"):
        native.bf16_bgemv(lib, x, w.transpose(1, 2))


def test_c_library_that_cannot_be_built_falls_back_with_a_warning(kernels: str, monkeypatch, tmp_path) -> None:
    if kernels != "C":
        pytest.skip("C kernels only")
    monkeypatch.setenv("CC", "false")  # a 'compiler' that always fails
    monkeypatch.setenv("DSV2_CACHE", str(tmp_path))
    native.reset()
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert native.library() is None
    q, s = quantize_int8(_w(8, 64))
    x = _x(2, 64, torch.float32)
    torch.testing.assert_close(QuantLinear.from_weight(q.float() * s[:, None], None, "int8", dtype=torch.float32)(x),
                               x @ (q.float() * s[:, None]).T, rtol=1e-5, atol=1e-5)


def test_c_bf16_gemv_matches_float64(kernels: str) -> None:
    """dsv2_bf16_bgemv on one weight: 1..17 rows (the 4-row tiles; 9-16 rows, on AVX2 builds, x packed once
    against 6-row weight tiles, 37 rows = a short last tile), an odd depth (the 4-row tiles at every count)."""
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    for k in (104, 105):
        w = _w(37, k).bfloat16()
        for m in (*range(1, 13), 16, 17):
            x = _x(m, k, torch.bfloat16 if m % 2 else torch.float32)
            ref = x.double() @ w.double().T
            assert (native.bf16_gemv(lib, x, w).double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (k, m)


def test_c_gemm_matches_float64(kernels: str) -> None:
    """dsv2_gemm (bf16 weights, int8 codes times a per-row scale, int4 in dsv2's pack, all as stored): row
    counts around its 6-row tiles (a last 1-3 rows run two weight panels at a time: one, two, a lone panel, a
    short second one), output columns around its 16-row weight panels, depths around its 512 / 256-column
    blocks (int8's scale applied once, after the last; int4 groups across block ends), fp32 and bf16
    activations, weight rows further apart than K, int4's 64-row blocks and shorter last blocks; a row's
    result the same bits wherever it falls in x."""
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    for m, n, k in ((1, 1, 1), (2, 16, 5), (5, 17, 7), (6, 16, 8), (7, 33, 512), (9, 50, 40), (13, 300, 513),
                    (32, 40, 300), (40, 650, 1100)):
        base = _w(n, k + 3)
        for xdt in (torch.float32, torch.bfloat16):
            x = _x(m, k, xdt)
            w = base.bfloat16()[:, :k]  # rows k + 3 elements apart
            ref = x.double() @ w.double().T
            got = native.gemm(lib, x, w)
            assert got.shape == (m, n) and got.dtype == torch.float32
            assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (m, n, k, xdt)
            q, s = quantize_int8(base[:, :k].contiguous())
            for sdt in (torch.float32, torch.bfloat16):
                sc = s.to(sdt)
                ref = x.double() @ (q.double() * sc.double()[:, None]).T
                got = native.gemm(lib, x, q, sc)
                assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (m, n, k, xdt, sdt)
    for n, k, group in ((16, 64, 32), (80, 256, 64), (176, 640, 128), (336, 512, 256)):  # 64-row blocks, tails
        for sdt in (torch.float32, torch.bfloat16):
            w4 = Int4Weight.quantize(_w(n, k), group, sdt)
            deq = w4.dequantize(torch.float64)
            for m in (1, 7, 9, 13, 32):
                x = _x(m, k, torch.float32)
                ref = x.double() @ deq.T
                got = native.int4_gemm(lib, x, w4.packed, w4.scales_and_zeros, group)
                assert got.shape == (m, w4.packed.shape[0])
                assert (got[:, :n].double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (n, k, group, sdt, m)
    # a row's sums run in one order wherever it falls in x (full 6-row tiles, or the last 1-3 rows' tiles)
    x, w = _x(32, 600, torch.float32), _w(70, 600).bfloat16()
    whole = native.gemm(lib, x, w)
    for lo, hi in ((0, 30), (30, 32), (0, 9), (9, 10), (10, 13), (13, 32)):
        assert torch.equal(native.gemm(lib, x[lo:hi], w), whole[lo:hi]), (lo, hi)
    with pytest.raises(TypeError, match="int8 codes with a scale"):
        native.gemm(lib, _x(2, 8, torch.float32), torch.zeros(3, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="8 columns, the weight 9"):
        native.gemm(lib, _x(2, 8, torch.float32), torch.zeros(3, 9, dtype=torch.bfloat16))


def test_policy_linear_one_bf16_row(kernels: str) -> None:
    """dsv2.precision.linear: one bf16 row through the C GEMV (or F.linear without it), bias included,
    within one bf16 rounding of the float64 product."""
    from dsv2.precision import linear

    w, b = _w(70, 96).bfloat16(), torch.randn(70, generator=GEN).bfloat16()
    x = _x(1, 96, torch.bfloat16).view(1, 1, 96)
    with torch.no_grad():
        y = linear(x, w, b)
    ref = x.double() @ w.double().T + b.double()
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, 70)
    assert (y.double() - ref).abs().max() <= 8e-3 * ref.abs().max()


def test_c_latent_decode_bf16_matches_float64(kernels: str) -> None:
    """dsv2_latent_decode_bf16 (absorbed MLA decode attention in fp32 over bf16 rows, for CPUs without native
    bf16 GEMMs): heads not a multiple of its 4-head tiles, a row width not a multiple of the vector width,
    runs of rows that cross its 12-row tiles and 3-row groups, one and two threads (the rows split, partial
    softmaxes merged); and `latent_decode` takes it for upcast bf16 rows."""
    if kernels != "C":
        pytest.skip("C kernels only")
    from dsv2.engine.attention import latent_decode

    lib = native.library()
    h, c, r = 5, 24, 13
    w = c + r
    pool = (torch.randn(400, w, generator=GEN) * 2).bfloat16()  # (slots,W): scores of a few units, peaked
    q = torch.randn(h, w, generator=GEN)
    scale = w ** -0.5
    threads = torch.get_num_threads()
    try:
        for runs in ([(7, 1)], [(0, 37), (100, 64), (250, 130)], [(3, 300)]):
            chunks = [pool[s: s + n] for s, n in runs]
            rows = torch.cat(chunks).double()  # (S,W)
            p = torch.softmax(q.double() @ rows.T * scale, dim=-1)
            ref = p @ rows[:, :c]  # (H,C)
            for t in (1, 2):
                torch.set_num_threads(t)
                y = native.latent_decode_bf16(lib, q, chunks, c, scale)
                assert y.shape == (h, c) and (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (runs, t)
            torch.testing.assert_close(latent_decode(q, chunks, c, scale, upcast=True).double(), ref,
                                       rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="expected bf16"):
        native.latent_decode_bf16(lib, q, [pool[:10].float()], c, scale)


def test_c_rms_norm_matches_the_model_and_float64(kernels: str) -> None:
    """dsv2_rms_norm (one call for `RMSNorm` in CPU inference): the model's PyTorch forward (fp32 normalisation,
    cast to x's dtype, times the weight) up to the summation order of mean(x²), and a float64 recomputation
    within that rounding; bf16 / fp32 x and weight, rows a view's stride apart, rows split between threads,
    a NaN row stays NaN and leaves the others alone."""
    if kernels != "C":
        pytest.skip("C kernels only")
    from dsv2.model.layers import RMSNorm

    lib = native.library()
    for xd in (torch.bfloat16, torch.float32):
        for wd in (torch.bfloat16, torch.float32):
            for shape in ((1, 1, 2048), (3, 5, 200), (300, 256)):  # 300 x 256: past the threaded size
                norm = RMSNorm(shape[-1], eps=1e-5, dtype=wd)
                norm.weight.data.copy_(torch.randn(shape[-1], generator=GEN))
                x = (torch.randn(*shape, generator=GEN) * 3).to(xd)
                with torch.no_grad():
                    want = norm(x)
                got = native.rms_norm(lib, x, norm.weight, norm.eps)
                assert got.dtype == want.dtype and got.shape == want.shape
                # a step or two of what is rounded: x · r cast to bf16 (bf16 x), the result (bf16 weight), fp32
                ulp = 2.0 ** -7 if torch.bfloat16 in (xd, wd) else 2.0 ** -21
                assert ((got.double() - want.double()).abs() <= ulp * want.double().abs() + 1e-30).all(), (xd, wd)
                x64 = x.double()
                ref = norm.weight.double() * x64 * (x64.pow(2).mean(-1, keepdim=True) + norm.eps).rsqrt()
                tol = 2.0 ** -7 if torch.bfloat16 in (xd, wd) else 2.0 ** -20  # the casts' rounding
                assert (got.double() - ref).abs().max() <= tol * ref.abs().max(), (xd, wd)
    x = torch.randn(4, 96, generator=GEN).bfloat16()
    view = x[:, 16:80]  # rows 96 apart
    norm = RMSNorm(64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(native.rms_norm(lib, view, norm.weight, norm.eps), norm(view), rtol=0, atol=0)
    x[1, 20] = float("nan")
    y = native.rms_norm(lib, view, norm.weight, norm.eps)
    assert y[1].isnan().all() and not y[[0, 2, 3]].isnan().any()


def test_c_rope_is_apply_rope(kernels: str) -> None:
    """dsv2_rope: bit for bit `apply_rope` (the same fp32 products, rounded as PyTorch rounds them) on the
    shapes MLA gives it: q's rope part (1, T, H, R), a view into the projection, with cos (T, 1, R/2), and
    k's (1, T, R); other shapes are declined (None), for the caller's PyTorch code."""
    if kernels != "C":
        pytest.skip("C kernels only")
    from dsv2.model.rope import apply_rope

    lib = native.library()
    t, h, r = 9, 5, 64
    cos, sin = torch.randn(t, r // 2, generator=GEN), torch.randn(t, r // 2, generator=GEN)
    for dt in (torch.bfloat16, torch.float32):
        q = torch.randn(1, t, h, 128 + r, generator=GEN).to(dt)[..., 128:]
        got = native.rope(lib, q, cos[:, None, :], sin[:, None, :])
        assert got is not None and got.dtype == dt and got.is_contiguous()
        assert torch.equal(got, apply_rope(q, cos[:, None, :], sin[:, None, :]))
        k = torch.randn(1, t, 512 + r, generator=GEN).to(dt)[..., 512:]
        assert torch.equal(native.rope(lib, k, cos, sin), apply_rope(k, cos, sin))
    two = torch.randn(2, t, r, generator=GEN)  # a batch of two, fp16, odd width, cos of other rows: declined
    assert native.rope(lib, two, cos, sin) is None
    assert native.rope(lib, two[:1].half(), cos, sin) is None
    assert native.rope(lib, torch.randn(1, t, r - 1), cos, sin) is None
    assert native.rope(lib, two[:1], cos[:3], sin[:3]) is None


def test_c_silu_mul_matches_pytorch_and_float64(kernels: str) -> None:
    """dsv2_silu_mul (SwiGLU's gating in one call): PyTorch's silu(g) · u up to the exp's last bit (bf16: the
    same roundings, so nearly every element equal), float64 within the casts' rounding; g and u the two halves
    of one gate-up product (rows strided), rows split between threads, NaN in, NaN out; other inputs declined."""
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    for dt, rows in ((torch.bfloat16, 1), (torch.bfloat16, 40), (torch.float32, 40)):
        gu = (torch.randn(rows, 2 * 1700, generator=GEN) * 4).to(dt)  # 40 x 1,700: past the threaded size
        gu[0, :4] = torch.tensor([float("nan"), 30.0, -30.0, 0.0])
        g, u = gu.chunk(2, dim=-1)
        got, want = native.silu_mul(lib, g, u), F.silu(g) * u
        assert got.dtype == dt and got.shape == g.shape and got.is_contiguous()
        assert got[0, 0].isnan() and not got.flatten()[1:].isnan().any()
        ok = got.flatten()[1:].double(), want.flatten()[1:].double()
        close = (ok[0] - ok[1]).abs() <= (2.0 ** -7 if dt == torch.bfloat16 else 2.0 ** -20) * ok[1].abs()
        assert close.all() and (dt == torch.float32 or (ok[0] != ok[1]).sum() <= ok[0].numel() // 1000)
        g64 = g.double()
        ref = (g64 * torch.sigmoid(g64) * u.double()).flatten()[1:]
        tol = 2.0 ** -7 if dt == torch.bfloat16 else 2.0 ** -20
        assert ((ok[0] - ref).abs() <= tol * ref.abs() + 1e-30).all()
    assert native.silu_mul(lib, g, u[:, :-1]) is None and native.silu_mul(lib, g.half(), u.half()) is None
    assert native.silu_mul(lib, g.t(), u.t()) is None


# ---- int8 activations ------------------------------------------------------------------------------------
def _rounded64(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int8-activation kernels round it (codes · d per 32 columns), in float64."""
    codes, d = quantize_activations_q8(x)
    return codes.double() * d.double().repeat_interleave(32, dim=1)[:, : x.shape[1]]


def test_activation_rounding_is_q8_and_c_agrees_bit_for_bit(kernels: str) -> None:
    """The PyTorch rounding: per 32 columns (a shorter last block) codes in [-127, 127] with the block's
    amax at ±127 and every value within half a step d/2 of codes·d; a zero block gives d = 0. The C
    rounding (every build) gives the same codes and scales, bit for bit."""
    x = _x(5, 104, torch.float32) * 3
    x[1, 32:64] = 0  # a block of zeros
    x[2, :4] = torch.tensor([2.5, -2.5, 0.5, 127.0])  # ties and the block's amax
    codes, d = quantize_activations_q8(x)
    assert codes.shape == (5, 104) and d.shape == (5, 4) and d[1, 1] == 0 and (codes[1, 32:64] == 0).all()
    blocks = F.pad(x, (0, 24)).view(5, 4, 32)
    assert torch.equal(d, blocks.abs().amax(-1) / 127)
    assert int(codes.abs().max()) == 127 and codes[2, 3] == 127
    err = (x.double() - _rounded64(x)).abs()
    assert (err <= d.double().repeat_interleave(32, 1)[:, :104] / 2 * (1 + 1e-6)).all()
    if kernels != "C":
        return
    lib = native.library()
    for xs in (x, x.bfloat16(), x[:, :31]):
        a, da = native.quant_q8(lib, xs)
        b, db = quantize_activations_q8(xs)
        assert torch.equal(a, b) and torch.equal(da, db)


def test_c_int8_gemv_q8_matches_float64(kernels: str, monkeypatch) -> None:
    """dsv2_int8_gemv_q8: 1..9 rows (row tiles of 4) and 33 / 40 (two weight rows at a time, an odd last
    one), 104 columns (a last block of 8), fp32 / bf16 x and scales, against the float64 product of the
    rounded activations: the integer sums are exact, so only the fp32 accumulation of the blocks differs.
    Row slices of 7 (`Q8_CHUNK_ROWS`, lowered) for the wrapper's slicing of many rows."""
    if kernels != "C":
        pytest.skip("C kernels only")
    monkeypatch.setattr(native, "Q8_CHUNK_ROWS", 7)
    lib = native.library()
    q, s = quantize_int8(_w(37, 104))
    q[0, :4] = torch.tensor([-127, 127, 0, -1], dtype=torch.int8)
    for scale in (s, s.bfloat16()):
        deq = q.double() * scale.double()[:, None]
        for m in (*range(1, 10), 33, 40):
            for dt in (torch.float32, torch.bfloat16):
                x = _x(m, 104, dt)
                ref = _rounded64(x) @ deq.T
                y = native.int8_gemv_q8(lib, x, q, scale)
                assert y.shape == (m, 37) and y.dtype == torch.float32
                assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (m, dt)


@pytest.mark.parametrize("n, k", [(64, 128), (176, 256), (80, 64), (1104, 1280)])
def test_c_int4_q8_kernels_match_float64(kernels: str, n: int, k: int, monkeypatch) -> None:
    """dsv2_int4_gemv_q8 for 1..9 rows and dsv2_int4_gemm_q8 for those and more: scale · Σ code · rounded x +
    (zero - 8 scale) · Σ x per group, the zero-point term from the exact x, in float64. Shapes: whole 64-row
    blocks, a last block of 48 / 16 rows; 1,104 x 1,280 gives the GEMM two weight-row chunks, K blocks of
    512 + 512 + 256 and, at 101 rows, two row blocks (96 + 5) with a short 2-row tile. The GEMV's row slices
    of 7 (`Q8_CHUNK_ROWS`, lowered)."""
    if kernels != "C":
        pytest.skip("C kernels only")
    monkeypatch.setattr(native, "Q8_CHUNK_ROWS", 7)
    lib = native.library()
    big = n > 1000
    for group in ((128, 256) if big else (32, 64) if k % 64 == 0 else (32,)):
        w4 = Int4Weight.quantize(_w(n, k), group, torch.bfloat16)
        np_ = w4.packed.shape[0]
        codes = unpack_int4(w4.packed, np_, k).double().view(np_, -1, group)  # (Np,K/g,g)
        sz = w4.scales_and_zeros.double()  # (K/g,Np,2)
        scale, zero = sz[..., 0].T, sz[..., 1].T  # (Np,K/g)
        for m in ((1, 4, 25, 101) if big else (*range(1, 10), 40)):
            x = _x(m, k, torch.bfloat16 if m % 2 else torch.float32)
            xr = _rounded64(x).view(m, -1, group)
            ref = torch.einsum("mgk,ngk->mng", xr, codes)  # (m,Np,K/g)
            ref = (ref * scale).sum(-1) + x.double().view(m, -1, group).sum(-1) @ (zero - 8 * scale).T
            for fn in (native.int4_gemv_q8, native.int4_gemm_q8) if m < 10 else (native.int4_gemm_q8,):
                y = fn(lib, x, w4.packed, w4.scales_and_zeros, group)
                assert y.shape == (m, np_) and y.dtype == torch.float32
                assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), (fn.__name__, group, m)
    for fn in (native.int4_gemv_q8, native.int4_gemm_q8):
        with pytest.raises(TypeError, match="bf16 scales"):
            fn(lib, x, w4.packed, w4.scales_and_zeros.float(), group)
        with pytest.raises(ValueError, match=f"activations have {k - 2} columns, the packed weight {k}"):
            fn(lib, x[:, 2:], w4.packed, w4.scales_and_zeros, group)


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_with_int8_activations_is_the_product_of_the_rounded_activations(weights: str,
                                                                                 dtype: torch.dtype) -> None:
    """A QuantLinear with int8 activations, at row counts of the integer GEMV and beyond it (the rounded
    activations and the dequantised weight; where int4 takes the C GEMV (bf16, vector build), its zero-point
    term (zero - 8 scale) · Σ x over the exact x."""
    n, k = 40, 96
    mod = QuantLinear.from_weight(_w(n, k), None, weights, 32, dtype)
    mod.int8_activations = True
    deq = mod.weight.double()  # (n,k): what the exact product multiplies by
    lib = native.library()
    gemv4 = weights == "int4" and dtype == torch.bfloat16 and lib is not None and native.fast_q8(lib)
    gemv4_rows = Q8_ROWS_AVX2 if gemv4 and native.int4_gemv_kind(lib) == 2 else INT4_Q8_ROWS
    for m in (1, 5, INT8_Q8_ROWS + 3, 131, INT8_Q8_ROWS_AVX2 + 5):  # the GEMVs, and above their limits
        x = _x(m, k, dtype)
        xr = _rounded64(x)
        ref = xr @ deq.T
        if gemv4 and m <= gemv4_rows:
            sz = mod.scales_and_zeros.double()[:, :n]  # (K/32,n,2)
            ref += (x.double() - xr).view(m, -1, 32).sum(-1) @ (sz[..., 1] - 8 * sz[..., 0])
        y = mod(x)
        assert y.dtype == dtype and y.shape == (m, n)
        assert (y.double() - ref).abs().max() <= _tol(dtype, ref), m
    assert "int8 activations" in repr(mod)


def test_c_rounded_activations_are_the_torch_ones(kernels: str) -> None:
    """dsv2_round_q8 (the activations of the rows that take the exact path): codes · d as the PyTorch rounding
    computes them, in fp32 bit for bit and in bf16 rounded once, a last block of 8 columns included."""
    if kernels != "C":
        pytest.skip("C kernels only")
    lib = native.library()
    x = _x(6, 104, torch.float32) * 3
    x[1, 32:64] = 0
    codes, d = quantize_activations_q8(x)
    want = codes.float() * d.repeat_interleave(32, dim=1)[:, :104]
    assert torch.equal(native.round_q8(lib, x), want)
    xb = x.bfloat16()
    codes, d = quantize_activations_q8(xb)
    want = (codes.float() * d.repeat_interleave(32, dim=1)[:, :104]).bfloat16()
    got = native.round_q8(lib, xb)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
