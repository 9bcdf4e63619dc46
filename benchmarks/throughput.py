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

from dsv2.config import ModelConfig
from dsv2.engine import Engine, SamplingParams, parse_bytes
from dsv2.model import DeepseekV2


def lite_shape(layers: int, attention_type: str, vocab: int) -> ModelConfig:
    return ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=layers, first_k_dense_replace=layers,
                                   attention_type=attention_type, vocab_size=vocab)


def run(attn: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    model = DeepseekV2(lite_shape(args.layers, attn, args.vocab), dtype=dt).eval()
    eng = Engine(model, kv_memory=args.kv_memory, block_size=args.block_size, max_batch=args.max_batch,
                 kv_cache_dtype=args.kv_cache_dtype)
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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other jobs on the machine skew timings)")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab, (args.requests, args.prompt_len), generator=g).tolist()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; V2-Lite attention shape, "
          f"{args.layers} dense layers, {args.dtype}; KV budget {args.kv_memory} "
          f"({parse_bytes(args.kv_memory) / 2**20:.0f} MiB); {args.requests} requests of {args.prompt_len} + "
          f"{args.new_tokens} tokens", flush=True)
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
