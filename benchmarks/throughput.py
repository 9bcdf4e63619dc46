"""Throughput under a fixed KV-cache budget: MLA vs the MHA baseline of the same dims, one process.

Same engine, same request stream (N prompts of P random tokens, G new tokens each, greedy), same
KV memory budget. The cache holds (d_c + d_R) = 576 elements per token per layer for MLA and
2 x 16 x 128 = 4096 for MHA (V2-Lite attention shape), so MLA keeps ~7x more sequences in flight.
Printed: bytes/token, sequences the budget holds, the most sequences actually running at once, and
generated tokens/s (end to end, and in decode steps only), with the MLA / MHA ratios.

    python benchmarks/throughput.py                       # ~3-5 minutes on 2 cores
    python benchmarks/throughput.py --kv-memory 64MiB --requests 256 --prompt-len 64
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _common import DTYPES, synced, timed_rounds
from dsv2.config import ModelConfig
from dsv2.engine import CacheError, Engine, SamplingParams, parse_bytes
from dsv2.engine.attention import DECODE_IMPLS
from dsv2.model import DeepseekV2


def lite_shape(layers: int, attention_type: str, vocab: int) -> ModelConfig:
    return ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=layers, first_k_dense_replace=layers,
                                   attention_type=attention_type, vocab_size=vocab)


def run(attn: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    dt = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = DeepseekV2(lite_shape(args.layers, attn, args.vocab), dtype=dt, device=args.device).eval()
    eng = Engine(model, kv_memory=args.kv_memory, block_size=args.block_size, max_batch=args.max_batch,
                 kv_cache_dtype=args.kv_cache_dtype, decode_impl=args.decode_impl)
    per_req = args.prompt_len + args.new_tokens - 1
    holds = eng.cache.num_blocks // eng.cache.blocks_for(per_req)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens))
    wall = time.perf_counter() - t0
    n = sum(len(o) for o in outs)
    st = eng.stats
    full = [dt for b, dt in st.decode_steps if b == st.max_running]  # steps at the largest batch
    return {"step_ms": 1e3 * sorted(full)[len(full) // 2],
            "bytes_per_token": eng.cache.bytes_per_token, "holds": holds, "max_running": st.max_running,
            "tok_s": n / wall, "decode_tok_s": st.decode_tokens_per_s, "wall": wall,
            "cache_mib": eng.cache.nbytes() / 2**20}


def gemm_probe(device: str, dtype: torch.dtype) -> str:
    """Cost of one dsv2 Linear (2048 -> 10944, the dense FFN's up projection) at M rows relative to one
    row, in inference: how far a decode step is from memory-bound as the batch grows. Beside it, plain
    F.linear on an fp32 copy of the weight (what dsv2 did before packing the weights for oneDNN).
    `CpuLinear` is what `dsv2.precision.prepare` swaps into a model (on a CPU with native bf16 GEMMs, or
    another device, it is a plain nn.Linear)."""
    from dsv2.precision import CpuLinear

    lin = CpuLinear(2048, 10944, bias=False, device=device, dtype=dtype)
    w32 = lin.weight.detach().float()
    with torch.inference_mode():
        xs = {m: torch.randn(m, 2048, device=device, dtype=dtype) for m in (1, 2, 8, 16, 64, 128)}
        fns = {("dsv2", m): (synced(lambda x=x: lin(x), device), 7) for m, x in xs.items()}
        fns.update({("plain", m): (synced(lambda x=x: torch.nn.functional.linear(x.float(), w32), device), 7)
                    for m, x in xs.items() if m > 1})
        best = timed_rounds(fns)
    one = best[("dsv2", 1)]
    return ", ".join(f"M={m} {best[('dsv2', m)] * 1e3:.1f} ms ({best[('dsv2', m)] / one:.1f}x"
                     + (f"; plain fp32 F.linear {best[('plain', m)] / best[('dsv2', m)]:.2f}x slower)" if m > 1
                        else ")") for m in xs)


def run_mix(args: argparse.Namespace) -> None:
    """The realistic mix (benchmarks/_workload.py) under one KV budget: blocks on demand vs reserved up
    front (MLA), and MLA vs MHA (both on demand), in one run: sequences held and decode tokens/s."""
    from _workload import drive, realistic_mix

    jobs = realistic_mix(args.requests, args.vocab, seed=0)
    print(f"realistic mix: {len(jobs)} requests, prompts 32-512 tokens, max_new_tokens 512, outputs stop after "
          f"16-128 tokens; KV budget {args.kv_memory}", flush=True)
    dt = DTYPES[args.dtype]
    res = {}
    for attn, alloc in (("mla", "on_demand"), ("mla", "reserve"), ("mha", "on_demand")):
        torch.manual_seed(0)
        model = DeepseekV2(lite_shape(args.layers, attn, args.vocab), dtype=dt, device=args.device).eval()
        eng = Engine(model, kv_memory=args.kv_memory, block_size=args.block_size, max_batch=args.max_batch,
                     kv_cache_dtype=args.kv_cache_dtype, decode_impl=args.decode_impl, allocation=alloc,
                     prefix_caching=False)
        try:
            res[attn, alloc] = r = drive(eng, jobs)
        except CacheError as e:  # a budget too small for one request of the mix (MHA's rows are 7x wider)
            print(f"{attn.upper():>4} {alloc:>9}: cannot run this mix: {e}")
            return
        print(f"{attn.upper():>4} {alloc:>9}: {eng.cache.capacity_tokens:>6} cache tokens, sequences held max "
              f"{r['max_running']:>4} / mean {r['mean_running']:6.1f}, {r['preemptions']:>3} preemptions, "
              f"{r['tok_s']:7.1f} tokens/s end-to-end, {r['decode_tok_s']:7.1f} in decode, {r['wall']:.0f}s",
              flush=True)
        del eng, model
    od, rv, mha = res["mla", "on_demand"], res["mla", "reserve"], res["mha", "on_demand"]
    print(f"MLA on demand / reserved up front: sequences held {od['mean_running'] / rv['mean_running']:.2f}x "
          f"(mean), {od['max_running'] / rv['max_running']:.2f}x (max); end-to-end tokens/s "
          f"{od['tok_s'] / rv['tok_s']:.2f}x; decode tokens/s {od['decode_tok_s'] / rv['decode_tok_s']:.2f}x")
    print(f"MLA / MHA (both on demand): sequences held {od['mean_running'] / mha['mean_running']:.2f}x (mean); "
          f"end-to-end tokens/s {od['tok_s'] / mha['tok_s']:.2f}x; decode tokens/s "
          f"{od['decode_tok_s'] / mha['decode_tok_s']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv-memory", default="16MiB", help="KV budget shared by all sequences (default 16MiB)")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (models and caches live there)")
    ap.add_argument("--probe-only", action="store_true", help="only the GEMM-vs-rows probe")
    ap.add_argument("--mix", action="store_true",
                    help="the realistic mix instead (prompts 32-512, max_new_tokens 512, outputs of 16-128): "
                         "on-demand blocks vs up-front reservation, and MLA vs MHA")
    ap.add_argument("--decode-impl", default="auto", choices=DECODE_IMPLS,
                    help="fast: per-sequence attention over the pool (auto's choice on CPU); gathered: one "
                         "padded batch through the model's attend_absorbed (auto's choice elsewhere)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mix:
        print(f"load average at start: {os.getloadavg()[0]:.2f}; threads {torch.get_num_threads()}")
        return run_mix(args)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other jobs on the machine skew timings)")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.requests, args.prompt_len), generator=g).tolist()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}; "
          f"V2-Lite attention shape, {args.layers} dense layers, {args.dtype}; KV budget {args.kv_memory} "
          f"({parse_bytes(args.kv_memory) / 2**20:.0f} MiB); {args.requests} requests of {args.prompt_len} + "
          f"{args.new_tokens} tokens", flush=True)
    dt = DTYPES[args.dtype]
    print(f"one Linear 2048->10944 at M rows, vs one row: {gemm_probe(args.device, dt)}", flush=True)
    if args.probe_only:
        return
    res = {}
    for attn in ("mla", "mha"):
        res[attn] = r = run(attn, args, prompts)
        print(f"{attn.upper():>4}: {r['bytes_per_token']:>6} B/token, budget holds {r['holds']:>4} sequences, "
              f"max running {r['max_running']:>4}, {r['tok_s']:8.1f} tokens/s end-to-end, "
              f"{r['decode_tok_s']:8.1f} tokens/s in decode (median step at that batch {r['step_ms']:.1f} ms), "
              f"{r['wall']:.1f}s", flush=True)
    m, h = res["mla"], res["mha"]
    print(f"MLA / MHA: cache bytes/token {h['bytes_per_token'] / m['bytes_per_token']:.2f}x smaller, "
          f"sequences held {m['holds'] / max(h['holds'], 1):.2f}x, end-to-end tokens/s "
          f"{m['tok_s'] / h['tok_s']:.2f}x, decode tokens/s {m['decode_tok_s'] / h['decode_tok_s']:.2f}x")
    print(f"at full batch: MLA runs {m['max_running'] / max(h['max_running'], 1):.2f}x the sequences per step, "
          f"and its step takes {m['step_ms'] / h['step_ms']:.2f}x as long as MHA's (the batch-size cost of "
          f"this machine's GEMMs and attention; ideal 1.00x when decode is memory-bound)")


if __name__ == "__main__":
    main()
