"""Prefix caching: N requests sharing one system prompt, each with its own question; caching on vs off.

32 requests of a 1,024-token system prompt + a 32-token question (greedy, a few new tokens each), same
model, same prompts, one process. Printed per run: prefill tokens actually computed, prefix-cache hit
tokens, mean and max time to first token (TTFT = Request.first_token_time - Request.arrival_time), and
the off / on ratios. Runs:
  off    prefix caching off: every request prefills its whole prompt;
  warm   on, after one earlier request carried the same system prompt (a server's steady state);
         the counts are those of the N requests only. Issue 10's targets: >= 10x fewer prefill
         tokens and >= 5x lower mean TTFT than off;
  burst  on, the N requests arrive together into an empty cache: a request hits only blocks computed
         and registered before it is admitted, so this shows how much the scheduler shares within a burst.
The tokens generated must be the same in every run (bf16 weights and cache: exact).

Needs the engine of issues 9/10 (Engine(prefix_caching=...), EngineStats.prefill_tokens and
.prefix_hit_tokens, Request.arrival_time / .first_token_time): it runs once those are merged.

    python benchmarks/prefix.py                      # V2-Lite attention shape, 2 dense layers, bf16
    python benchmarks/prefix.py --requests 8 --layers 1
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from _common import DTYPES, machine
from dsv2.config import ModelConfig
from dsv2.engine import Engine, SamplingParams
from dsv2.model import DeepseekV2


def run(model: DeepseekV2, args: argparse.Namespace, prompts: list[list[int]], caching: bool,
        warm_prompt: list[int] | None) -> dict:
    params = SamplingParams(max_new_tokens=args.new_tokens)
    per_req = len(prompts[0]) + args.new_tokens
    eng = Engine(model, prefix_caching=caching, max_tokens=(len(prompts) + 1) * per_req,  # room for all: no eviction
                 block_size=args.block_size, max_batch=len(prompts), kv_cache_dtype=args.kv_cache_dtype)
    if warm_prompt is not None:
        eng.generate([warm_prompt], params)
    prefill0, hits0 = eng.stats.prefill_tokens, eng.stats.prefix_hit_tokens
    t0 = time.perf_counter()
    reqs = [eng.add_request(p, params) for p in prompts]  # all arrive now
    while any(r.finish_reason is None for r in reqs):
        eng.step()
    wall = time.perf_counter() - t0
    errors = [r.error for r in reqs if r.finish_reason == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ttft = [r.first_token_time - r.arrival_time for r in reqs]
    return {"prefill": eng.stats.prefill_tokens - prefill0, "hits": eng.stats.prefix_hit_tokens - hits0,
            "ttft": statistics.mean(ttft), "ttft_max": max(ttft), "wall": wall,
            "outputs": [list(r.output) for r in reqs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-len", type=int, default=1024, help="tokens of the shared system prompt")
    ap.add_argument("--question-len", type=int, default=32, help="tokens of each request's own question")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    system = [rng.randrange(args.vocab) for _ in range(args.system_len)]
    question = lambda: [rng.randrange(args.vocab) for _ in range(args.question_len)]
    prompts = [system + question() for _ in range(args.requests)]
    warm_prompt = system + question()  # the earlier request of the warm run: same system prompt, another question
    cfg = ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=args.layers,
                                  first_k_dense_replace=args.layers, vocab_size=args.vocab)
    torch.manual_seed(0)
    model = DeepseekV2(cfg, dtype=DTYPES[args.dtype], device=args.device).eval()
    print(f"{machine()}; load average {os.getloadavg()[0]:.2f}\nV2-Lite attention shape, {args.layers} dense "
          f"layers, {args.dtype}, cache {args.kv_cache_dtype}, block {args.block_size}; {args.requests} requests "
          f"of {args.system_len} shared + {args.question_len} own tokens, {args.new_tokens} new tokens each",
          flush=True)
    Engine(model, max_tokens=256, block_size=args.block_size).generate([question()], SamplingParams(max_new_tokens=2))
    res = {}
    for name, caching, warm in (("off", False, None), ("warm", True, warm_prompt), ("burst", True, None)):
        res[name] = r = run(model, args, prompts, caching, warm)
        print(f"{name:>5}: prefill {r['prefill']:>7} tokens computed, {r['hits']:>7} from the cache; TTFT mean "
              f"{r['ttft'] * 1e3:8.1f} ms, max {r['ttft_max'] * 1e3:8.1f} ms; all {r['wall']:.1f}s", flush=True)
    off = res["off"]
    for name in ("warm", "burst"):
        r = res[name]
        print(f"off / {name}: prefill tokens {off['prefill'] / max(r['prefill'], 1):.1f}x fewer, mean TTFT "
              f"{off['ttft'] / r['ttft']:.1f}x lower, same tokens: {r['outputs'] == off['outputs']}")
    print("targets (issue 10, warm): >= 10x fewer prefill tokens, >= 5x lower mean TTFT")


if __name__ == "__main__":
    main()
