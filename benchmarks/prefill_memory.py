"""Peak memory of a long chunked prefill through the engine (issue 3: a 32K prompt must fit in a few GiB).

V2-Lite attention shape (hidden 2048, 16 heads, d_c 512, d_R 64), 2 dense layers, bf16, one prompt.
Prints the process's peak RSS after loading, after a warm-up request (which makes the fp32 weight
copies a CPU without native bf16 uses), and after the long prefill.

    python benchmarks/prefill_memory.py              # 32768 tokens (~10 min on 2 AVX2 cores)
    python benchmarks/prefill_memory.py --tokens 8192
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import peak_rss_gib
from dsv2 import DeepseekV2, ModelConfig
from dsv2.engine import Engine, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    args = ap.parse_args()
    cfg = ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=2, first_k_dense_replace=2)
    torch.manual_seed(0)
    model = DeepseekV2(cfg, dtype=torch.bfloat16).eval()
    print(f"weights: peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    engine = Engine(model, max_tokens=max(args.tokens, 600) + 64, prefill_chunk=args.prefill_chunk)
    cache_mib = engine.cache.bytes_per_token * (max(args.tokens, 600) + 64) / 2**20
    print(f"engine + cache ({cache_mib:.1f} MiB): peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    engine.generate([torch.randint(0, cfg.vocab_size, (600,)).tolist()], SamplingParams(max_new_tokens=2))
    base = peak_rss_gib()
    print(f"after a 600-token warm-up: peak RSS {base:.2f} GiB", flush=True)
    t = time.perf_counter()
    engine.generate([torch.randint(0, cfg.vocab_size, (args.tokens,)).tolist()], SamplingParams(max_new_tokens=2))
    print(f"{args.tokens}-token prefill (+2 tokens) in {time.perf_counter() - t:.0f} s: peak RSS "
          f"{peak_rss_gib():.2f} GiB (+{peak_rss_gib() - base:.2f} GiB over the warm engine)")


if __name__ == "__main__":
    main()
