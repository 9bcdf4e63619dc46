"""Issue 13's CPU table in one run: decode, prefill and parallel sequences for bf16 / int8 / int4 weights.

Model: issue 13's shape (V2-Lite attention, 2 dense layers, vocab 102,400; random weights, bf16
activations), one Engine per weight format, all alive at once so that every measurement interleaves
the formats (best of N calls; load from other jobs hits each format alike).

- decode, batch 1, at 1K / 4K / 8K / 32K context: the cache is filled with synthetic rows (as
  benchmarks/decode.py does), then one token is decoded at position S, N times;
- prefill of a 512 / 2,048-token prompt (Engine.generate, one new token; prefix cache off);
- 1 / 4 / 16 / 64 parallel sequences of 32 prompt + 32 new tokens through Engine.generate: decode
  tok/s and prompt tok/s (engine.stats) and all tokens / wall time;
- this machine's streaming read bandwidth (sum of a 1 GiB fp32 tensor) and GEMM rate (bf16, fp32),
  and each figure's roofline fraction: decode = bytes a step must read (weights but the embedding +
  the cache) / bandwidth / time; prefill = FLOPs / GEMM rate / time; parallel decode = the larger of
  the two per step / time.

    python benchmarks/cpu.py --quick --threads 1      # small contexts, a few minutes
    python benchmarks/cpu.py                          # the issue's sizes
    python benchmarks/cpu.py --contention             # demo-size model: quiet vs beside a busy process
    python benchmarks/cpu.py --checkpoint DIR         # the weights of a saved checkpoint (hub layout) instead
    python benchmarks/cpu.py --int8-activations       # + int8 / int4 with int8-rounded activations ("a8")

With --checkpoint the bf16 model is `DeepseekV2.from_pretrained(DIR, weights="bf16")` and int8 / int4 are
quantised while loading (`weights=`, `group_size=`); benchmarks/llamacpp.py runs this file's functions beside
llama.cpp on the same checkpoint.

llama.cpp's and "dsv2 before" figures are quoted from issue 13 (2-core AVX2 machine, 2 threads),
not measured by this script.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch

from _common import machine, peak_rss_gib, timed_rounds
from decode import lite_shape, synthetic_rows
from dsv2.engine import Engine, SamplingParams
from dsv2.engine.runner import SeqWork
from dsv2.model import DeepseekV2
from dsv2.precision import native_low_precision
from dsv2.quant import quantize_model
from dsv2.threads import pick_threads

# issue 13's table (llama.cpp and dsv2 when the issue was filed; 2-core AVX2 machine, 2 threads): quoted, not measured
ISSUE_DECODE_MS = {1024: (40.2, 49.2), 4096: (52.0, 72.1), 8192: (57.6, 76.9), 32768: (106.1, 91.7)}
ISSUE_Q8_DECODE_MS = {1024: 24.5, 8192: 37.1}
ISSUE_PREFILL_TPS = {512: (432, 334), 2048: (326, 335)}
ISSUE_PARALLEL = {  # n: ((decode tok/s), (prompt tok/s), (all tok / wall)) as (llama.cpp, dsv2 before)
    4: ((70.7, 35.4), (380, 223), (113, 63)),
    16: ((103.9, 86.0), (404, 189), (173, 124)),
    64: ((124.4, 128.1), (395, 208), (194, 162)),
}


def decode_step_fn(engine: Engine, rows: list[torch.Tensor]) -> tuple[Callable[[], object], Callable[[], None]]:
    """Fill a sequence of S = len(rows[0]) cached tokens; (a function that decodes one token at position S,
    every call the same work; a function that frees the sequence)."""
    cache, s = engine.cache, rows[0].shape[0]
    held = ExitStack()
    blocks = held.enter_context(engine.reserve(s + 1))
    for i, r in enumerate(rows):
        cache.write(i, cache.slots(blocks, 0, s), r)
    work = [SeqWork(blocks, s, [7])]
    return (lambda: engine.runner.execute(work)), held.close


class Probes:
    """This machine's read bandwidth (sum of a 1 GiB fp32 tensor: twice the 480 MiB L3 of the test machine)
    and GEMM rates (1024x2048 @ 2048x2048, bf16 and fp32): the best seen, re-timed beside every row of the
    table (the probes join its interleaved rounds), so that a row's roofline is not taken from a moment
    when other jobs held the machine."""

    def __init__(self) -> None:
        self.big = torch.randn(256 * 2**20)
        self.mats = {dt: (torch.randn(1024, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt))
                     for dt in (torch.bfloat16, torch.float32)}
        self.best = {"bw": 0.0, "gemm_bf16": 0.0, "gemm_fp32": 0.0}
        self.update(timed_rounds(self.fns(5)))

    def fns(self, n: int) -> dict[str, tuple[Callable[[], object], int]]:
        (a, b), (c, d) = self.mats[torch.bfloat16], self.mats[torch.float32]
        return {"bw": (self.big.sum, n), "gemm_bf16": ((lambda: a @ b), n), "gemm_fp32": ((lambda: c @ d), n)}

    def update(self, t: dict[str, float]) -> None:
        work = {"bw": self.big.numel() * 4, "gemm_bf16": 2 * 1024 * 2048 * 2048, "gemm_fp32": 2 * 1024 * 2048 * 2048}
        for k, w in work.items():
            if k in t:
                self.best[k] = max(self.best[k], w / t[k])


def weight_bytes(model: torch.nn.Module, skip_embedding: bool = True) -> int:
    """Bytes of every parameter and buffer (tied storage once), the input embedding left out: a decode
    step reads one row of it."""
    seen: dict[int, int] = {}
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if skip_embedding and n.startswith("embed_tokens"):
            continue
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def linear_params(model: DeepseekV2) -> int:
    """Parameters that take part in a token's matmuls (all but the embedding)."""
    cfg = model.config
    return cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size


def build(fmt: str, group_size: int, checkpoint: str | None = None) -> DeepseekV2:
    """One format of issue 13's model: random (seed 0) and quantised in memory, or loaded from `checkpoint`
    (a hub-layout folder; int8 / int4 quantised while loading, group_size for int4 only)."""
    if checkpoint is not None:
        model = DeepseekV2.from_pretrained(checkpoint, dtype=torch.bfloat16, weights=fmt,
                                           group_size=group_size if fmt == "int4" else None).eval()
        gc.collect()
        return model
    model = DeepseekV2(lite_shape(2), dtype=torch.bfloat16).eval()
    model.reset_parameters(seed=0)
    if fmt != "bf16":
        quantize_model(model, fmt, group_size)
    gc.collect()
    return model


def prefill_flops(model: DeepseekV2, n: int) -> float:
    """Matmul FLOPs of an n-token prompt: the layers' weights for n rows, lm_head for the last row only,
    causal attention (expanded K/V, n^2/2 pairs)."""
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    attn = 2 * (n * n / 2) * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return 2 * (linear_params(model) - head) * n + 2 * head + attn


def parallel_run(eng: Engine, prompts: list[list[int]], sp: SamplingParams,
                 res: dict[str, tuple[float, ...]], key: str) -> None:
    """One Engine.generate of every prompt; res[key] = best (decode tok/s, prompt tok/s, all tokens / wall)."""
    st = eng.stats
    st0 = (st.decode_tokens, st.decode_s, st.prefill_tokens, st.prefill_s)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, sp)
    wall = time.perf_counter() - t0
    st = eng.stats
    dec = (st.decode_tokens - st0[0]) / max(st.decode_s - st0[1], 1e-9)
    pre = (st.prefill_tokens - st0[2]) / max(st.prefill_s - st0[3], 1e-9)
    tot = (sum(map(len, outs)) + sum(map(len, prompts))) / wall
    old = res.get(key)
    res[key] = (dec, pre, tot) if old is None else tuple(max(a, b) for a, b in zip(old, (dec, pre, tot)))


def run_table(args: argparse.Namespace) -> None:
    contexts = args.contexts or ([256, 1024] if args.quick else [1024, 4096, 8192, 32768])
    prompts = args.prompts or ([128, 512] if args.quick else [512, 2048])
    parallel = args.parallel or ([1, 4, 16] if args.quick else [1, 4, 16, 64])
    steps = args.steps or (3 if args.quick else 5)
    probes = Probes()
    m = probes.best
    # the GEMM rate prompts run at: bf16 where it is native, else fp32 (dsv2's CPU policy upcasts on AVX2)
    gemm = "gemm_bf16" if native_low_precision(torch.device("cpu"), torch.bfloat16) else "gemm_fp32"
    print(f"machine: {machine()}")
    print(f"at start: read bandwidth {m['bw'] / 1e9:.1f} GB/s, GEMM bf16 {m['gemm_bf16'] / 1e9:.0f} GFLOP/s, "
          f"fp32 {m['gemm_fp32'] / 1e9:.0f} GFLOP/s (re-timed beside every row; rooflines use the best seen)",
          flush=True)
    engines: dict[str, Engine] = {}
    models: dict[str, DeepseekV2] = {}
    max_tokens = max(max(contexts) + 64, max(prompts) + 64, max(parallel) * 64 + 64) + 64
    for fmt in args.formats:
        models[fmt] = build(fmt, args.group_size, args.checkpoint)
        a8 = [False, True] if args.int8_activations and fmt != "bf16" else [False]
        for act8 in a8:  # (two engines on one quantised model: each step sets the modules' switch its way)
            engines[fmt + (" a8" if act8 else "")] = Engine(
                models[fmt], kv_cache_dtype="bf16", max_tokens=max_tokens, prefix_caching=False,
                max_batch=max(64, max(parallel)), int8_activations=act8)
        print(f"{fmt}: weights {weight_bytes(models[fmt], False) / 2**20:.0f} MiB "
              f"({weight_bytes(models[fmt]) / 2**20:.0f} MiB read per decode step); process peak RSS so far "
              f"{peak_rss_gib():.2f} GiB", flush=True)
    models.update({name: models[name.split()[0]] for name in engines})  # "int4 a8" -> the int4 model
    cfg = models[args.formats[0]].config
    kv_bpt = engines[args.formats[0]].cache.bytes_per_token
    rows: list[tuple[str, str, str, Callable[[], float] | None, str]] = []  # work, format, ours, roofline, issue
    head = f"{'workload':<34} {'fmt':<7} {'dsv2 now':>22} {'roofline':>9}   issue 13 (not measured here)"

    def line(work: str, fmt: str, ours: str, roof: Callable[[], float] | None, issue: str) -> str:
        return f"{work:<34} {fmt:<7} {ours:>22} {format(roof(), '.0%') if roof else '':>9}   {issue}"

    def emit(work: str, fmt: str, ours: str, roof: Callable[[], float] | None, issue: str) -> None:
        rows.append((work, fmt, ours, roof, issue))
        print(line(work, fmt, ours, roof, issue), flush=True)

    print(f"\n(as measured; roofline against the best probe so far)\n{head}")
    # ---- decode, batch 1
    for s in contexts:
        rows_kv = synthetic_rows(cfg, s, torch.bfloat16, seed=s)
        fns, frees = {}, []
        for fmt, eng in engines.items():
            fn, free = decode_step_fn(eng, rows_kv)
            fns[fmt] = (fn, steps)
            frees.append(free)
        t = timed_rounds({**fns, **probes.fns(steps)})
        probes.update(t)
        for free in frees:
            free()
        del rows_kv
        for fmt in engines:
            nbytes = weight_bytes(models[fmt]) + s * kv_bpt
            roof = (lambda nb=nbytes, tt=t[fmt]: nb / m["bw"] / tt)
            issue = ""
            if fmt == "bf16" and s in ISSUE_DECODE_MS:
                lc, old = ISSUE_DECODE_MS[s]
                issue = f"llama.cpp {lc} ms, dsv2 before {old} ms"
            elif fmt == "int8" and s in ISSUE_Q8_DECODE_MS:
                issue = f"llama.cpp Q8_0 {ISSUE_Q8_DECODE_MS[s]} ms"
            emit(f"decode b=1, {s} ctx", fmt, f"{t[fmt] * 1e3:.1f} ms ({nbytes / t[fmt] / 1e9:.1f} GB/s)", roof, issue)
    # ---- prefill
    for n in prompts:
        g = torch.Generator().manual_seed(n)
        prompt = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
        p1 = SamplingParams(max_new_tokens=1)
        t = timed_rounds({**{fmt: ((lambda e=eng, p=prompt, sp=p1: e.generate([p], sp)), max(1, steps // 2))
                             for fmt, eng in engines.items()}, **probes.fns(max(1, steps // 2))})
        probes.update(t)
        for fmt in engines:
            fl = prefill_flops(models[fmt], n)
            roof = (lambda fl=fl, tt=t[fmt]: fl / m[gemm] / tt)
            issue = ""
            if fmt == "bf16" and n in ISSUE_PREFILL_TPS:
                lc, old = ISSUE_PREFILL_TPS[n]
                issue = f"llama.cpp {lc} tok/s, dsv2 before {old} tok/s"
            emit(f"prefill {n}-token prompt", fmt, f"{n / t[fmt]:.0f} tok/s", roof, issue)
    # ---- parallel sequences: 32 prompt + 32 new tokens each
    wb = {fmt: weight_bytes(models[fmt]) for fmt in engines}
    for n in parallel:
        g = torch.Generator().manual_seed(1000 + n)
        ps = [torch.randint(3, cfg.vocab_size, (32,), generator=g).tolist() for _ in range(n)]
        sp = SamplingParams(max_new_tokens=32)
        res: dict[str, tuple[float, ...]] = {}
        calls = 1 if n >= 64 else 2
        probes.update(timed_rounds({
            **{fmt: ((lambda e=eng, f=fmt, ps=ps, sp=sp, res=res: parallel_run(e, ps, sp, res, f)), calls)
               for fmt, eng in engines.items()}, **probes.fns(calls)}))
        for fmt in engines:
            dec, pre, tot = res[fmt]
            # a decode step of n sequences: read the weights once (+ the cache), n tokens of matmuls
            nb, fl = wb[fmt] + n * 64 * kv_bpt, 2 * linear_params(models[fmt]) * n
            roof = (lambda nb=nb, fl=fl, dec=dec, n=n: dec * max(nb / m["bw"], fl / m[gemm]) / n)
            issue = ""
            if fmt == "bf16" and n in ISSUE_PARALLEL:
                (ld, od), (lp, op), (lt, ot) = ISSUE_PARALLEL[n]
                issue = f"llama.cpp {ld}/{lp}/{lt}, dsv2 before {od}/{op}/{ot}"
            emit(f"{n} x (32+32), dec/prompt/all tok/s", fmt, f"{dec:.1f} / {pre:.0f} / {tot:.1f}", roof, issue)
    print(f"\npeak RSS of this run (all {len(engines)} formats loaded at once): {peak_rss_gib():.2f} GiB")
    engines.clear()
    models.clear()
    del probes.big, probes.mats
    gc.collect()
    if not args.no_rss:
        for fmt, (peak, now) in rss_per_format(args.formats, args.group_size, args.checkpoint).items():
            emit("memory: one process, peak / end RSS", fmt, f"{peak:.2f} / {now:.2f} GiB", None,
                 "llama.cpp 1.1-1.3 GiB, dsv2 before 2.5-3.2 GiB" if fmt == "bf16" else "")
        print("(int8/int4 processes build the bf16 model and quantise it in memory: their peak includes the bf16 "
              "model; loading a quantised folder streams instead)")
    print(f"\nTABLE (rooflines against the best of the run: read bandwidth {m['bw'] / 1e9:.1f} GB/s, GEMM bf16 "
          f"{m['gemm_bf16'] / 1e9:.0f} GFLOP/s, fp32 {m['gemm_fp32'] / 1e9:.0f} GFLOP/s)\n{head}")
    for r in rows:
        print(line(*r))
    print("roofline: decode = (weights but embedding + S x KV bytes/token) / read bandwidth / time; prefill = "
          f"matmul FLOPs / {gemm[5:]} GEMM rate / time; parallel = max(bytes/BW, FLOPs/GEMM) per step / time per "
          f"step. int8/int4 FLOPs are counted at the {gemm[5:]} rate ({gemm[5:]}: the GEMMs' dtype on this CPU).")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def rss_child(fmt: str, group_size: int, checkpoint: str | None = None) -> None:
    """(In a fresh process) build one format, make an engine, run a 512-token prompt and 4 x (32+32); print
    'RSS <peak GiB> <now GiB>' from /proc/self/status (VmHWM, VmRSS)."""
    model = build(fmt, group_size, checkpoint)
    eng = Engine(model, kv_cache_dtype="bf16", max_tokens=4096, prefix_caching=False)
    eng.generate([list(range(3, 515))], SamplingParams(max_new_tokens=1))
    eng.generate([list(range(3 + i, 35 + i)) for i in range(4)], SamplingParams(max_new_tokens=32))
    gc.collect()
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    kib = {k: int(status[k].split()[0]) for k in ("VmHWM", "VmRSS")}
    print(f"RSS {kib['VmHWM'] / 2**20:.3f} {kib['VmRSS'] / 2**20:.3f}")


def rss_per_format(formats: list[str], group_size: int, checkpoint: str | None = None
                   ) -> dict[str, tuple[float, float]]:
    """Peak and end RSS (GiB) of one process per format (rss_child)."""
    out = {}
    for fmt in formats:
        ckpt = ["--checkpoint", checkpoint] if checkpoint is not None else []
        r = subprocess.run([sys.executable, __file__, "--rss-child", fmt, "--group-size", str(group_size),
                            "--threads", str(torch.get_num_threads()), *ckpt], capture_output=True, text=True,
                           check=True)
        line = next(x for x in r.stdout.splitlines() if x.startswith("RSS "))
        out[fmt] = (float(line.split()[1]), float(line.split()[2]))
    return out


def run_contention(args: argparse.Namespace) -> None:
    """Decode ms/token of the demo-size model (fp32, random weights), quiet vs beside one busy process, with
    2 threads vs pick_threads(None)'s count (measured while the busy process runs)."""
    model, eng = demo_engine()
    cfg = model.config
    prompt = list(range(3, 35))
    sp = SamplingParams(max_new_tokens=args.contention_tokens)

    def ms_per_token(threads: int) -> float:
        torch.set_num_threads(threads)
        best = float("inf")
        for _ in range(3):
            d0, s0 = eng.stats.decode_tokens, eng.stats.decode_s
            eng.generate([prompt], sp)
            best = min(best, (eng.stats.decode_s - s0) / (eng.stats.decode_tokens - d0))
        return best * 1e3

    print(f"machine: {machine()}; demo-size model {cfg.num_parameters() / 1e6:.1f}M parameters, fp32")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    quiet = {th: ms_per_token(th) for th in (1, 2)}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(args.settle)  # let the 1-minute load average see the busy process
        picked = pick_threads(None, default=2)
        load = os.getloadavg()[0]
        loud = {th: ms_per_token(th) for th in (1, 2)}
    finally:
        busy.kill()
        busy.wait()
    print(f"beside one busy process: load average {load:.2f}, pick_threads(None) with torch's default 2 -> {picked}")
    print(f"{'threads':>8} {'quiet ms/token':>15} {'busy ms/token':>14} {'busy/quiet':>11}")
    for th in (1, 2):
        print(f"{th:>8} {quiet[th]:>15.2f} {loud[th]:>14.2f} {loud[th] / quiet[th]:>10.1f}x")
    print(f"beside the busy process, 2 threads take {loud[2] / quiet[2]:.1f}x their quiet time per token; the picked "
          f"{picked} thread(s) take {loud[picked]:.2f} ms = {loud[picked] / quiet[picked]:.1f}x their quiet time, "
          f"{loud[2] / loud[picked]:.1f}x faster than 2 threads there")


def demo_engine() -> tuple[DeepseekV2, Engine]:
    """The demo-size model (src/dsv2/train/demo.py's DEMO_MODEL, fp32 as `dsv2 generate` loads it), random."""
    from dsv2.config import ModelConfig
    from dsv2.train.demo import DEMO_MODEL, DEMO_VOCAB

    cfg = ModelConfig.from_preset("small", **DEMO_MODEL, vocab_size=DEMO_VOCAB)
    model = DeepseekV2(cfg, dtype=torch.float32).eval()
    model.reset_parameters(seed=0)
    return model, Engine(model, max_tokens=4096, prefix_caching=False)


def run_profile(args: argparse.Namespace) -> None:
    """torch.profiler over batch-1 decode steps of the demo-size model at a 256-token context, one thread."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    model, eng = demo_engine()
    cfg = model.config
    fn, free = decode_step_fn(eng, synthetic_rows(cfg, 256, torch.float32, seed=0))
    for _ in range(5):
        fn()
    n = args.profile_steps
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    step = (time.perf_counter() - t0) / n
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    free()
    ev = prof.key_averages()
    nbytes = weight_bytes(model)
    print(f"demo-size model {cfg.num_parameters() / 1e6:.1f}M parameters, fp32, 1 thread: {step * 1e3:.2f} ms a step "
          f"(unprofiled); weights read a step {nbytes / 2**20:.1f} MiB -> {nbytes / step / 1e9:.1f} GB/s")
    print(f"aten ops a step: {sum(e.count for e in ev if e.key.startswith('aten::')) / n:.0f} (all levels)")
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small contexts / prompts / batches (minutes)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: dsv2.threads.pick_threads: torch's, capped at idle cores)")
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4"], choices=("bf16", "int8", "int4"))
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--int8-activations", action="store_true",
                    help="also int8 / int4 with activations rounded to int8 (\"int8 a8\", \"int4 a8\": "
                         "EngineConfig.int8_activations, the rounding llama.cpp's Q8_0 / Q4_0 products use)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--prompts", type=int, nargs="+", default=None)
    ap.add_argument("--parallel", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per row (best of)")
    ap.add_argument("--no-rss", action="store_true", help="skip the one-process-per-format memory rows")
    ap.add_argument("--checkpoint", default=None,
                    help="load the weights from this hub-layout folder (default: random, seed 0)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--contention", action="store_true", help="instead: threads under contention (demo-size model)")
    ap.add_argument("--profile", action="store_true", help="instead: profile the demo-size model's decode step")
    ap.add_argument("--profile-steps", type=int, default=50)
    ap.add_argument("--contention-tokens", type=int, default=32)
    ap.add_argument("--settle", type=float, default=20.0, help="seconds the busy process runs before measuring")
    args = ap.parse_args()
    if args.rss_child:
        torch.set_num_threads(pick_threads(args.threads))
        rss_child(args.rss_child, args.group_size, args.checkpoint)
        return
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other jobs on the machine skew timings)")
    torch.manual_seed(0)
    if args.contention:
        run_contention(args)
        return
    if args.profile:
        run_profile(args)
        return
    torch.set_num_threads(pick_threads(args.threads))
    print(f"threads: {torch.get_num_threads()}")
    run_table(args)


if __name__ == "__main__":
    main()
