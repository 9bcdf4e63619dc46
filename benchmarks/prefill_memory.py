"""Long-prompt prefill through the engine: time and peak memory (issue 3: a 32K prompt in a few GiB).

V2-Lite attention shape (hidden 2048, 16 heads, d_c 512, d_R 64), 2 dense layers, bf16, one prompt.
Each prefill implementation runs in its own child process (peak RSS is per process), one after the
other on the same seed, and the parent prints the side-by-side ratio:

- layer:   dsv2's default for MLA: one layer at a time over the whole prompt, every cached token
           decompressed once per layer (O(S) decompression).
- chunked: one 512-token chunk through all layers at a time, re-decompressing the whole cached prefix
           at every chunk (O(S^2 / chunk) decompression): the model's own modules, the reference.

Each child prints its peak RSS after loading, after a warm-up request (which makes the fp32 weight
copies a CPU without native bf16 uses), and after the long prefill.

    python benchmarks/prefill_memory.py                  # 32768 tokens, both (~15 min on 2 AVX2 cores)
    python benchmarks/prefill_memory.py --tokens 8192 --impl layer
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

import torch

from _common import machine, peak_rss_gib
from dsv2 import DeepseekV2, ModelConfig
from dsv2.engine import Engine, SamplingParams


def child(tokens: int, chunk: int, impl: str, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    cfg = ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=2, first_k_dense_replace=2)
    torch.manual_seed(0)
    model = DeepseekV2(cfg, dtype=torch.bfloat16).eval()
    print(f"  weights: peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    budget = max(tokens, 600) + 64
    engine = Engine(model, max_tokens=budget, prefill_chunk=chunk, prefill_impl=impl)
    print(f"  engine + cache ({engine.cache.nbytes() / 2**20:.1f} MiB): peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    engine.generate([torch.randint(0, cfg.vocab_size, (600,)).tolist()], SamplingParams(max_new_tokens=2))
    base = peak_rss_gib()
    print(f"  after a 600-token warm-up: peak RSS {base:.2f} GiB", flush=True)
    prompt = torch.randint(0, cfg.vocab_size, (tokens,)).tolist()
    t = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_new_tokens=2))
    dt = time.perf_counter() - t
    print(f"  RESULT {impl}: {tokens}-token prefill (+2 tokens) in {dt:.1f} s, {tokens / dt:.0f} tokens/s: "
          f"peak RSS {peak_rss_gib():.2f} GiB (+{peak_rss_gib() - base:.2f} GiB over the warm engine)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--impl", choices=["both", "layer", "chunked"], default="both")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.impl != "both":
        child(args.tokens, args.prefill_chunk, args.impl, args.threads)
        return
    print(machine(), flush=True)
    secs = {}
    for impl in ("layer", "chunked"):
        print(f"{impl}:", flush=True)
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--prefill-chunk", str(args.prefill_chunk),
               "--impl", impl] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out, end="", flush=True)
        secs[impl] = float(re.search(r"in ([0-9.]+) s", out.split("RESULT")[1]).group(1))
    print(f"layer-major / chunked prefill speed: {secs['chunked'] / secs['layer']:.2f}x")


if __name__ == "__main__":
    main()
