"""dsv2's C GEMV kernels against the paths they replaced, matrix by matrix, alternating in one process.

    python benchmarks/kernels.py --threads 1
    python benchmarks/kernels.py --threads 2
    # the AVX2 paths on an AVX512 machine: PyTorch, oneDNN, MKL and dsv2's kernels capped at AVX2
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 DSV2_CFLAGS="-mavx2 -mfma" \
        python benchmarks/kernels.py --threads 2

Each row times one product on the issue-13 model's shapes (the 102,400 x 2,048 lm_head unless noted),
best of 4 rounds that alternate the two sides, and prints the ratio (old / new time, > 1: the new kernel
is faster). Random weights; the kernels' results are checked against float64 in tests/quant. Where bf16
GEMMs are not native (AVX2), also: 2-16 bf16 rows through the C GEMV against CpuLinear's packed fp32 copy,
and one sequence's MLA decode attention in C against upcasting its rows for two PyTorch GEMMs. The opt-in
int8-activation GEMVs (integer dot products on activations rounded to int8) against the exact ones, and at
their row limits against the rounded activations' exact path (panels + GEMM); dequantised panels of 384+ rows
against 1M-element ones. dsv2's C GEMM on bf16 / int8 / int4 weights as stored (CPUs without AVX512F) against
the packed fp32 copy and the dequantised panels, int4's int8-activation GEMM against the GEMVs, and routed
experts through the C GEMM against per-call fp32 copies. `--only int8act` (or int4 / int8 / bf16 / emulated /
panels / gemm) runs one section.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from _common import timed_rounds
from dsv2 import precision
from dsv2.engine import attention
from dsv2.precision import CpuExperts, CpuLinear, native_low_precision
from dsv2.quant import kernels, native
from dsv2.quant.kernels import Int4Weight, aten_int4_layout, quantize_int8, unpack_int4


def best(fns: dict[str, Callable[[], object]], rounds: int = 4, calls: int = 3) -> dict[str, float]:
    """Best seconds a call: `calls` calls timed together after an untimed one, `rounds` rounds interleaved."""
    return timed_rounds({k: (fn, rounds) for k, fn in fns.items()}, batch=calls, warm_each_round=True)


def row(name: str, old: str, new: str, t: dict[str, float], nbytes: int | None = None) -> None:
    bw = f" ({nbytes / t[new] / 1e9:.1f} GB/s)" if nbytes else ""
    print(f"| {name} | {old} {t[old] * 1e3:.2f} ms | {new} {t[new] * 1e3:.2f} ms{bw} | {t[old] / t[new]:.2f}x |",
          flush=True)


def int4_rows(lib, g: torch.Generator, n: int, k: int) -> None:
    for gs in (32, 128):
        w4 = Int4Weight.quantize(torch.randn(n, k, generator=g) * 0.05, gs, torch.bfloat16)
        nb = w4.packed.nbytes + w4.scales_and_zeros.nbytes

        def ours(x: torch.Tensor, w4: Int4Weight = w4, gs: int = gs) -> torch.Tensor:
            return native.int4_gemv(lib, x, w4.packed, w4.scales_and_zeros, gs)

        # aten's kernel reads its own packing, which is dsv2's only under PyTorch's AVX512 kernels
        theirs = w4.packed if aten_int4_layout() else torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_int4(w4.packed, w4.packed.shape[0], w4.packed.shape[1] * 2).to(torch.int32), 1)

        def aten(x: torch.Tensor, w4: Int4Weight = w4, gs: int = gs, theirs: torch.Tensor = theirs) -> torch.Tensor:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, theirs, gs, w4.scales_and_zeros)

        def panels(x: torch.Tensor, w4: Int4Weight = w4) -> torch.Tensor:  # the dequantise + GEMM path
            with no_c_gemm():
                return w4._panels(lib, x)

        for m in (1, 4, 16):
            x = torch.randn(m, k, generator=g).bfloat16()
            t = best({"aten": lambda x=x: aten(x), "dsv2": lambda x=x: ours(x)})
            row(f"int4 g{gs}, {m} row(s)", "aten", "dsv2", t, nb if m == 1 else None)
        for m in (32, 128):
            x = torch.randn(m, k, generator=g).bfloat16()
            t = best({"panels": lambda x=x: panels(x), "dsv2": lambda x=x: ours(x)}, rounds=2)
            row(f"int4 g{gs}, {m} rows", "panels", "dsv2", t)


def int8_rows(lib, g: torch.Generator, n: int, k: int) -> None:
    if not native.fast_int8_bf16_gemv(lib):  # no AVX512_BF16: int8 has only the fp32 GEMV
        return
    q, s = quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    s = s.bfloat16()
    x = torch.randn(1, k, generator=g).bfloat16()
    t = best({"fp32 GEMV": lambda: native.int8_gemv(lib, x, q, s),
              "nibbles": lambda: native.int8_gemv_bf16(lib, x, q, s)})
    row("int8, 1 bf16 row", "fp32 GEMV", "nibbles", t, q.nbytes)


def bf16_rows(lib, g: torch.Generator, n: int, k: int) -> None:
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    x = torch.randn(1, k, generator=g).bfloat16()
    t = best({"F.linear": lambda: F.linear(x, w), "dsv2": lambda: native.bf16_gemv(lib, x, w)})
    row("bf16, 1 row", "F.linear", "dsv2", t, w.nbytes)
    for m in (2, 4):
        xm = torch.randn(m, k, generator=g).bfloat16()
        t = best({"F.linear": lambda xm=xm: F.linear(xm, w), "dsv2": lambda xm=xm: native.bf16_gemv(lib, xm, w)})
        row(f"bf16, {m} rows", "F.linear", "dsv2", t)
    kv_b = (torch.randn(16 * 256, 512, generator=g) * 0.05).bfloat16().view(16, 256, 512)
    w_uv = kv_b[:, 128:]  # (H,Dv,C): the heads' rows of kv_b_proj, as MLA.absorbed_weights gives them
    o = torch.randn(16, 1, 512, generator=g).bfloat16()
    w_uv_t = w_uv.transpose(1, 2).contiguous()  # (H,C,Dv): what the absorbed path multiplied by before
    t = best({"torch.bmm": lambda: torch.bmm(o, w_uv_t),
              "dsv2": lambda: native.bf16_bgemv(lib, o, w_uv)}, calls=50)
    row("MLA W_UV, 16 heads x 128 x 512, 1 row", "torch.bmm", "dsv2", t)


def emulated_bf16_rows(lib, g: torch.Generator, n: int, k: int) -> None:
    """Where bf16 GEMMs are not native (AVX2): few bf16 rows through the C GEMV against the fp32 GEMM on the
    packed fp32 copy that `CpuLinear` keeps (and, at 12 / 16 rows on AVX2 builds, against dsv2's C GEMM), and
    one sequence's decode attention in C against upcasting its rows into scratch for two PyTorch GEMMs
    (`latent_decode` without the library)."""
    if native_low_precision(torch.device("cpu"), torch.bfloat16):
        return
    for nk in ((n, k), (10_944, 2_048), (2_048, 10_944)):
        lin = CpuLinear(nk[1], nk[0], bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(*nk, generator=g) * 0.05)
        for m in (2, 4, 8, 16):
            xm = torch.randn(m, nk[1], generator=g).bfloat16()
            with torch.inference_mode():
                t = best({"packed fp32": lambda xm=xm, lin=lin: packed(lin, xm),
                          "dsv2": lambda xm=xm, lin=lin: native.bf16_gemv(lib, xm, lin.weight)})
            row(f"bf16 {nk[0]} x {nk[1]}, {m} rows", "packed fp32", "dsv2", t)
        if native.gemm_kind(lib) == 2:  # 9-16 rows: the GEMV's x-stationary tiles against the C GEMM beside them
            for m in (12, 16):
                xm = torch.randn(m, nk[1], generator=g).bfloat16()
                t = best({"dsv2 GEMM": lambda xm=xm, lin=lin: native.gemm(lib, xm, lin.weight),
                          "dsv2 GEMV": lambda xm=xm, lin=lin: native.bf16_gemv(lib, xm, lin.weight)})
                row(f"bf16 {nk[0]} x {nk[1]}, {m} rows", "dsv2 GEMM", "dsv2 GEMV", t)
    h, c, w = 16, 512, 576
    for s in (1024, 4096, 8192, 32768):
        pool = torch.randn(s, w, generator=g).bfloat16()
        chunk = max(256, (1 << 20) // w)  # the engine's upcast chunk
        chunks = [pool[i:i + chunk] for i in range(0, s, chunk)]
        q, scratch = torch.randn(h, w, generator=g), torch.empty(chunk, w)
        t = best({"upcast + GEMMs": lambda q=q, ch=chunks, sc=scratch: latent_decode_upcast(q, ch, c, 0.04, sc),
                  "dsv2": lambda q=q, pool=pool: native.latent_decode_bf16(lib, q, [pool], c, 0.04)}, calls=5)
        row(f"MLA decode attention, {s} rows", "upcast + GEMMs", "dsv2", t)
    # the absorbed W_UK product of a decode step in fp32 rows (the engine's upcast attention): a cached fp32
    # copy through torch.bmm (before) against the bf16 weight as stored in the C GEMV (CpuMLA)
    w_uk_t = (torch.randn(16, 512, 128, generator=g) * 0.05).bfloat16()  # (H,C,Dn), W_UKᵀ of one layer
    w_uk_f = w_uk_t.float()
    for m in (1, 4, 16):
        qn = torch.randn(16, m, 128, generator=g)
        t = best({"fp32 copy + bmm": lambda qn=qn: torch.bmm(qn, w_uk_f.transpose(1, 2)),
                  "dsv2": lambda qn=qn: precision.bmm_nt(qn, w_uk_t)}, calls=20)
        row(f"MLA W_UK, 16 heads x 512 x 128, {m} fp32 row(s)", "fp32 copy + bmm", "dsv2", t)


def int8act_rows(lib, g: torch.Generator, n: int, k: int) -> None:
    """The int8-activation GEMVs against the exact ones on the same weights (a different result: the rounded
    activations'), and against the exact path of the rounded activations where the row limits lie."""
    if not native.fast_q8(lib):
        return
    for nk in ((n, k), (10_944, 2_048), (2_048, 10_944)):
        q, s = quantize_int8(torch.randn(*nk, generator=g) * 0.05)
        s = s.bfloat16()
        for m in (1, 4, 16, 32):
            x = torch.randn(m, nk[1], generator=g).bfloat16()
            t = best({"exact": lambda x=x, q=q, s=s: kernels.int8_mm(x, q, s),
                      "int8 act": lambda x=x, q=q, s=s: native.int8_gemv_q8(lib, x, q, s)})
            row(f"int8 {nk[0]} x {nk[1]}, {m} row(s)", "exact", "int8 act", t, q.nbytes if m == 1 else None)
        for m in (32, 64):
            x = torch.randn(m, nk[1], generator=g).bfloat16()
            t = best({"rounded + exact": lambda x=x, q=q, s=s: kernels.int8_mm(kernels.round_activations_q8(x), q, s),
                      "int8 act": lambda x=x, q=q, s=s: native.int8_gemv_q8(lib, x, q, s)}, rounds=2)
            row(f"int8 {nk[0]} x {nk[1]}, {m} rows", "rounded + exact", "int8 act", t)
    for gs in (32, 128):
        for nk in ((n, k), (10_944, 2_048), (2_048, 10_944)):
            w4 = Int4Weight.quantize(torch.randn(*nk, generator=g) * 0.05, gs, torch.bfloat16)
            nb = w4.packed.nbytes + w4.scales_and_zeros.nbytes
            for m in (1, 4, 16, 32):
                x = torch.randn(m, nk[1], generator=g).bfloat16()
                t = best({"exact": lambda x=x, w4=w4: w4.mm(x), "int8 act": lambda x=x, w4=w4: w4.mm(x, True)})
                row(f"int4 g{gs} {nk[0]} x {nk[1]}, {m} row(s)", "exact", "int8 act", t, nb if m == 1 else None)
            for m in (64, 128, 256):
                x = torch.randn(m, nk[1], generator=g).bfloat16()
                t = best({"rounded + exact": lambda x=x, w4=w4: w4.mm(kernels.round_activations_q8(x)),
                          "int8 act": lambda x=x, w4=w4: int4_q8_gemv(w4, x)}, rounds=2)
                row(f"int4 g{gs} {nk[0]} x {nk[1]}, {m} rows", "rounded + exact", "int8 act", t)


def panel_rows(lib, g: torch.Generator, n: int, k: int) -> None:
    """Dequantised panels of at least 384 rows against the 1M-element panels they replaced (64 rows at
    K = 10,944), on the MLP's two shapes: the whole quantised product above the GEMV's row limits."""
    for nk in ((10_944, 2_048), (2_048, 10_944)):
        w4 = Int4Weight.quantize(torch.randn(*nk, generator=g) * 0.05, 128, torch.bfloat16)
        for m in (64, 512):
            x = torch.randn(m, nk[1], generator=g).bfloat16()

            def old(x: torch.Tensor = x, w4: Int4Weight = w4) -> torch.Tensor:
                saved, kernels._PANEL_MIN_ROWS = kernels._PANEL_MIN_ROWS, 64
                try:
                    return w4._panels(lib, x)
                finally:
                    kernels._PANEL_MIN_ROWS = saved
            t = best({"1M panels": old, "384+ rows": lambda x=x, w4=w4: w4._panels(lib, x)}, rounds=2, calls=1)
            row(f"int4 g128 panels {nk[0]} x {nk[1]}, {m} rows", "1M panels", "384+ rows", t)


def gemm_rows(lib, g: torch.Generator, n: int, k: int) -> None:
    """dsv2's C GEMM on the weights as stored (fp32 FMAs; used where bf16 GEMMs are emulated and the CPU has no
    AVX512F) against the paths it replaced: bf16 through CpuLinear's packed fp32 copy (oneDNN), int8 and int4
    through dequantised panels and the dense fp32 GEMM, at batched-decode and prompt row counts; int4 with int8
    activations, the integer GEMM against the 4-row GEMVs; and V2-Lite's routed experts (`CpuExperts`) against
    the fp32 copies they made per call before."""
    if native.gemm_kind(lib) == 0:
        return
    for nk in ((10_944, 2_048), (2_048, 10_944), (3_072, 2_048)):
        w = torch.randn(*nk, generator=g) * 0.05
        lin = CpuLinear(nk[1], nk[0], bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
        q, s = quantize_int8(w)
        s = s.bfloat16()
        w4 = Int4Weight.quantize(w, 128, torch.bfloat16)
        kp = w4.packed.shape[1] * 2
        for m in (17, 32, 64, 512):
            x = torch.randn(m, nk[1], generator=g).bfloat16()
            xp = F.pad(x, (0, kp - nk[1]))
            flop = 2 * m * nk[0] * nk[1]
            with torch.inference_mode():
                pairs = {
                    "bf16": {"packed fp32": lambda x=x, lin=lin: packed(lin, x),
                             "dsv2 GEMM": lambda x=x, lin=lin: native.gemm(lib, x, lin.weight)},
                    "int8": {"panels": lambda x=x, q=q, s=s: no_gemm_call(kernels.int8_mm, x, q, s),
                             "dsv2 GEMM": lambda x=x, q=q, s=s: native.gemm(lib, x, q, s)},
                    "int4 g128": {"panels": lambda x=x, w4=w4: no_gemm_call(w4._panels, lib, x),
                                  "dsv2 GEMM": lambda xp=xp, w4=w4: native.int4_gemm(lib, xp, w4.packed,
                                                                                     w4.scales_and_zeros, 128)},
                }
                if native.fast_q8(lib):  # int8 activations: the integer GEMM against the 4-row GEMVs it replaced
                    pairs["int4 g128 a8"] = {
                        "int8-act GEMVs": lambda xp=xp, w4=w4: native.int4_gemv_q8(lib, xp, w4.packed,
                                                                                   w4.scales_and_zeros, 128),
                        "int8-act GEMM": lambda xp=xp, w4=w4: native.int4_gemm_q8(lib, xp, w4.packed,
                                                                                  w4.scales_and_zeros, 128)}
                for fmt, fns in pairs.items():
                    t = best(fns, rounds=2, calls=1 if m == 512 else 3)
                    old, new = fns
                    print(f"| {fmt} {nk[0]} x {nk[1]}, {m} rows | {old} {t[old] * 1e3:.2f} ms "
                          f"({flop / t[old] / 1e9:.0f} GFLOPS) | {new} {t[new] * 1e3:.2f} ms "
                          f"({flop / t[new] / 1e9:.0f} GFLOPS) | {t[old] / t[new]:.2f}x |", flush=True)


    # routed experts of V2-Lite's shape (64 x 2,048 -> 1,408, 6 picks a token): each expert above CpuExperts'
    # GEMV_ROWS through the C GEMM, against fp32 copies of its weights made per call (the path without it)
    ex = CpuExperts(64, 2_048, 1_408, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    for m in (64, 512):
        x = torch.randn(m, 2_048, generator=g).bfloat16()
        idx = torch.stack([torch.randperm(64, generator=g)[:6] for _ in range(m)])
        wts = torch.rand(m, 6, generator=g)
        with torch.inference_mode():
            t = best({"fp32 copies": lambda x=x, idx=idx, wts=wts: no_gemm_call(ex, x, idx, wts),
                      "dsv2 GEMM": lambda x=x, idx=idx, wts=wts: ex(x, idx, wts)}, rounds=2, calls=1)
        row(f"bf16 routed experts 64 x 2,048 -> 1,408, {m} tokens x 6 picks", "fp32 copies", "dsv2 GEMM", t)


class no_c_gemm:
    """Within: the callers see no dsv2 C GEMM (`native.gemm_kind` 0), so they take the paths it replaced."""

    def __enter__(self) -> None:
        self.saved, native.gemm_kind = native.gemm_kind, lambda lib: 0

    def __exit__(self, *exc: object) -> None:
        native.gemm_kind = self.saved


def no_gemm_call(fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    with no_c_gemm():
        return fn(*args)


def int4_q8_gemv(w4: Int4Weight, x: torch.Tensor) -> torch.Tensor:
    """The int4 int8-activation product at any row count (the GEMVs' row limit lifted for the call): the GEMVs,
    or above `INT4_Q8_GEMM_ROWS` on the AVX2 build the integer GEMM."""
    saved, kernels.INT4_Q8_ROWS = kernels.INT4_Q8_ROWS, 1 << 30
    try:
        return w4.mm(x, True)
    finally:
        kernels.INT4_Q8_ROWS = saved  # (the AVX2 build has no limit: Q8_ROWS_AVX2)


def packed(lin: CpuLinear, x: torch.Tensor) -> torch.Tensor:
    """CpuLinear's GEMM on its packed fp32 copy (the C GEMV's row limit set to 0 and the C GEMM hidden for the
    call)."""
    saved, precision.UPCAST_GEMV_ROWS = precision.UPCAST_GEMV_ROWS, 0
    try:
        with no_c_gemm():
            return lin(x)
    finally:
        precision.UPCAST_GEMV_ROWS = saved


def latent_decode_upcast(q: torch.Tensor, chunks: list[torch.Tensor], c: int, scale: float,
                         scratch: torch.Tensor) -> torch.Tensor:
    """`latent_decode`'s PyTorch path (the C library hidden from it)."""
    lib = native._state.pop("lib", None)
    native._state["lib"] = None
    try:
        return attention.latent_decode(q, chunks, c, scale, True, scratch)
    finally:
        native._state["lib"] = lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    sections = {"int4": int4_rows, "int8": int8_rows, "bf16": bf16_rows, "emulated": emulated_bf16_rows,
                "int8act": int8act_rows, "panels": panel_rows, "gemm": gemm_rows}
    ap.add_argument("--only", choices=sorted(sections), default=None, help="run one section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = native.library()
    if lib is None or not native.fast_int4_gemv(lib):
        raise SystemExit("needs dsv2's C kernels built with AVX512_BF16 + VBMI or AVX2 + FMA (this CPU or build "
                         "has neither)")
    g = torch.Generator().manual_seed(0)
    isa = {1: "AVX512_BF16 + VBMI", 2: "AVX2 + FMA"}[lib.dsv2_int4_gemv_fast()]
    print(f"threads {args.threads}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); "
          f"dsv2 kernels: {isa}")
    print("| product | before | now | ratio |\n|---|---|---|---|")
    for name, section in sections.items():
        if args.only in (None, name):
            section(lib, g, 102_400, 2_048)


if __name__ == "__main__":
    main()
