"""Long-prompt prefill through the engine: time and peak memory, today's engine vs the old layer-major path.

V2-Lite attention shape (hidden 2048, 16 heads, d_c 512, d_R 64), 2 dense layers, bf16, one prompt.
For every prompt length each implementation runs in its own child process (peak RSS is per process),
one after the other on the same seed and prompt, and the parent prints them side by side:

- new: `Engine.generate` (issue 9): the prompt goes through `forward_hidden` in chunks of
       min(prefill_chunk, max_num_batched_tokens) tokens per step; each chunk attends expanded over the
       cached prefix one `key_block` of decompressed keys at a time, merged by log-sum-exp, so no more
       than one key block of K/V exists at a time whatever the prompt's length;
- old: the engine's layer-major prefill before issue 9 (`_legacy_runner.LegacyRunner.prefill`, a
       benchmark-only copy): per layer, all prompt tokens' latent rows are cached, the whole context's
       K/V is decompressed once (O(S) decompression, but one layer's K/V of all S tokens held at once),
       then 512-token query chunks attend causally over it. Then one decode step (as generate's 2nd token).

Each child prints its peak RSS after loading, after a 600-token warm-up request, and after the long
prompt (+2 generated tokens); "added" = peak after - peak after the warm-up. It includes the prompt's
own latent rows written to the cache (tokens x 2304 B), reported beside it.

--time-limit S: a child that has not finished its prompt after S seconds stops between engine steps
(new) or is killed (old) and reports what it had (new: the peak so far and how far it got).
--tail N: a memory probe for prompts too long to run whole: the first tokens - N latent rows are
written synthetically (as benchmarks/decode.py does), then only the last N prompt tokens are prefilled
on top of them (new: engine steps over the cached prefix; old: the layer-major path with a cached
prefix, which still decompresses the whole context's K/V but holds (N, D) instead of (S, D)
activations). Time is then that of the tail only.

    python benchmarks/prefill_memory.py                          # 16K, 32K, 64K; new and old
    python benchmarks/prefill_memory.py --tokens 32768 --impls new --prefill-chunk 4096 \\
        --max-num-batched-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from _common import machine, peak_rss_gib
from _legacy_runner import LegacyRunner, SeqSlots
from dsv2 import DeepseekV2, ModelConfig
from dsv2.engine import Engine, SamplingParams
from dsv2.engine.config import EngineConfig
from dsv2.engine.runner import SeqWork

WARMUP = 600


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def synthetic_prefix(engine: Engine, seq, n: int) -> None:
    """Write n synthetic latent rows (RMS-normalised scale) as the first n tokens of seq, a block at a time."""
    g = torch.Generator().manual_seed(1)
    cache = engine.cache
    for a in range(0, n, 4096):
        b = min(a + 4096, n)
        for i in range(cache.num_layers):
            rows = torch.randn(b - a, cache.width, generator=g).to(engine.model.lm_head.weight.dtype)
            cache.write(i, cache.slots(seq.blocks, a, b - a), rows)
    seq.length = n


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens, impl, tail = args.tokens[0], args.impls[0], args.tail
    cfg = ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=2, first_k_dense_replace=2)
    torch.manual_seed(0)
    model = DeepseekV2(cfg, dtype=torch.bfloat16).eval()
    print(f"  weights: peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    budget = max(tokens, WARMUP) + 64
    kw = {k: v for k, v in (("prefill_chunk", args.prefill_chunk), ("key_block", args.key_block),
                            ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
    engine = Engine(model, max_tokens=budget, **kw)  # prepares the model (dsv2.precision) for both paths
    ref = LegacyRunner(model, engine.cache, prefill_chunk=args.legacy_chunk) if impl == "old" else None
    print(f"  engine + cache ({engine.cache.nbytes() / 2**20:.1f} MiB): peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    prompt = torch.randint(0, cfg.vocab_size, (tokens,)).tolist()

    def old_generate(p: list[int], start: int = 0) -> float:
        """Prefill + one decode (as generate(max_new_tokens=2)) after `start` synthetic rows; its seconds."""
        with engine.reserve(len(p) + 1) as blocks:
            seq = SeqSlots(blocks)
            if start:
                synthetic_prefix(engine, seq, start)
            t0 = time.perf_counter()
            first = int(ref.prefill(seq, p).argmax())
            ref.decode([seq], [first])
            return time.perf_counter() - t0

    if ref is not None:
        old_generate(prompt[:WARMUP])
    else:
        engine.generate([prompt[:WARMUP]], SamplingParams(max_new_tokens=2))
    base = peak_rss_gib()
    print(f"  after a {WARMUP}-token warm-up: peak RSS {base:.2f} GiB", flush=True)
    done, t, cpu = tokens, time.perf_counter(), cpu_seconds()
    if ref is not None:
        dt = old_generate(prompt, tokens - tail if tail else 0)
    elif tail:
        with engine.reserve(tokens + 1) as blocks:
            synthetic_prefix(engine, SeqSlots(blocks), tokens - tail)
            t = time.perf_counter()
            step = min(engine.config.prefill_chunk, engine.config.max_num_batched_tokens)
            for a in range(tokens - tail, tokens, step):
                b = min(a + step, tokens)
                out = engine.runner.execute([SeqWork(blocks, a, prompt[a:b], "last" if b == tokens else "none")])
            engine.runner.execute([SeqWork(blocks, tokens, [int(out[0].argmax())])])
    else:
        req = engine.add_request(prompt, SamplingParams(max_new_tokens=2))
        while engine.has_unfinished():
            engine.step()
            if args.time_limit and time.perf_counter() - t > args.time_limit and engine.has_unfinished():
                done = req.num_computed
                engine.abort(req.rid)
                break
    if ref is None:
        dt = time.perf_counter() - t
    res = dict(impl=impl, tokens=tokens, tail=tail, done=done, seconds=dt, cpu_s=cpu_seconds() - cpu,
               base=base, peak=peak_rss_gib(),
               latent_gib=tokens * engine.cache.bytes_per_token / 2**30, config=vars(engine.config))
    print(f"  {impl}: {done} of {tokens} tokens" + (f" (last {tail}; first {tokens - tail} synthetic)" if tail else "")
          + f" in {dt:.1f} s ({res['cpu_s']:.0f} CPU s); peak RSS {res['peak']:.2f} GiB, "
          f"+{res['peak'] - base:.2f} GiB over the warm engine (latent rows of the prompt: "
          f"{res['latent_gib']:.3f} GiB)", flush=True)
    print("RESULT " + json.dumps(res), flush=True)


def run_child(args: argparse.Namespace, impl: str, tokens: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tokens", str(tokens), "--impls", impl,
           "--legacy-chunk", str(args.legacy_chunk)]
    for flag in ("prefill_chunk", "key_block", "max_num_batched_tokens", "threads", "time_limit"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if tokens >= args.tail_from:
        cmd += ["--tail", str(args.tail)]
    limit = None
    if args.time_limit and impl == "old":  # the old path cannot stop between steps: kill it (+ load time)
        limit = args.time_limit + 120
    print(f"{impl}, {tokens} tokens:", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out + f"  killed after {limit} s (did not finish)", flush=True)
        return None
    out = proc.stdout
    print("".join(line + "\n" for line in out.splitlines() if not line.startswith("RESULT")), end="", flush=True)
    if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
        return None
    return json.loads(out.split("RESULT ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--impls", nargs="+", choices=["new", "old"], default=["old", "new"],
                    help="run in this order for every length")
    d = EngineConfig()
    ap.add_argument("--prefill-chunk", type=int, default=None, help=f"engine (default {d.prefill_chunk})")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help=f"engine (default {d.max_num_batched_tokens})")
    ap.add_argument("--key-block", type=int, default=None, help=f"engine (default {d.key_block})")
    ap.add_argument("--legacy-chunk", type=int, default=512, help="query chunk of the old layer-major path")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per child prompt (see above)")
    ap.add_argument("--tail", type=int, default=0, help="memory probe: prefill only the last N tokens (see above)")
    ap.add_argument("--tail-from", type=int, default=1 << 62, help="use --tail for prompts of at least this length")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    print(machine(), f"load average {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
          flush=True)
    res: dict[tuple[str, int], dict | None] = {}
    for tokens in args.tokens:
        for impl in args.impls:
            res[impl, tokens] = run_child(args, impl, tokens)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    print(f"{'tokens':>7} {'impl':>4} {'done':>7} {'seconds':>8} {'CPU s':>6} {'tok/s':>6} {'peak GiB':>9} "
          f"{'added GiB':>10} {'latent GiB':>11} {'added-latent':>13} {'new/old time':>13} {'new/old CPU':>12}")
    for (impl, tokens), r in res.items():
        if r is None:
            print(f"{tokens:>7} {impl:>4}  did not finish / failed")
            continue
        old = res.get(("old", tokens))
        ratio = cpu_ratio = ""
        if impl == "new" and old and old["done"] == r["done"] and old["tail"] == r["tail"]:
            ratio, cpu_ratio = f"{r['seconds'] / old['seconds']:.3f}x", f"{r['cpu_s'] / old['cpu_s']:.3f}x"
        added = r["peak"] - r["base"]
        tps = (r["tail"] or r["done"]) / r["seconds"]
        print(f"{tokens:>7} {impl:>4} {r['done']:>7} {r['seconds']:>8.1f} {r['cpu_s']:>6.0f} {tps:>6.0f} "
              f"{r['peak']:>9.2f} {added:>10.2f} {r['latent_gib']:>11.3f} {added - r['latent_gib']:>13.2f} "
              f"{ratio:>13} {cpu_ratio:>12}")


if __name__ == "__main__":
    main()
