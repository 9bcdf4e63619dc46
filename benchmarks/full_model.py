"""DeepSeek-V2-Lite end to end on this machine, int8 and int4 (and bf16 if asked): load, memory, speed,
and the memory-bandwidth roofline of decode, measured in one run.

    python benchmarks/full_model.py                         # the real model: 27 layers (writes 31 GB once)
    python benchmarks/full_model.py --layers 4              # a 4-layer slice at V2-Lite's real width
    python benchmarks/full_model.py --model DIR             # an existing bf16 hub folder (e.g. the download)

A random V2-Lite-shaped folder is written once with `dsv2 init` (cached in --work). Then, for each
weight format, in a fresh child process (so that its peak RSS is its own):
  quantize `dsv2 quantize` into --work (one module at a time): seconds, peak RSS; with --stream-load
           also `from_pretrained(bf16 DIR, weights=W)` (quantised in memory while streaming)
  load     (a second child) the quantised folder, memory-mapped: seconds, peak RSS
  prefill  one 512-token prompt, tokens/s
  decode   a 1024-token context, then one token at a time (absorbed MLA), tokens/s (best of rounds)
  bytes    weight bytes the quantised modules read for one decode token (each module counts what it
           reads), plus the float weights (router, kv_b_proj, norms, one embedding row) and the KV
           cache; beside it, what reading all 64 experts would cost
  roofline bytes per token / read bandwidth (a 1 GiB fp32 sum, timed interleaved with the decode
           steps) = the fastest decode the memory bus allows; decode tok/s as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import machine, timed_rounds
from dsv2 import DeepseekV2, ModelConfig
from dsv2.checkpoint import write_random_checkpoint
from dsv2.model.attention import DenseCache
from dsv2.quant.convert import quantize_folder


def peak_rss_gib() -> float:
    """Peak RSS of this process's own address space (VmHWM; ru_maxrss would count the parent it was forked from)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def lite(layers: int) -> ModelConfig:
    return ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=layers)


def bytes_per_token(model: DeepseekV2, context: int) -> dict[str, int]:
    """Weight + cache bytes one decode token reads, counted by the quantised modules during the last forward."""
    cfg = model.config
    counted = sum(getattr(m, "bytes_read", 0) for m in model.modules())
    floats = sum(p.nbytes for n, p in model.named_parameters() if not n.startswith("embed_tokens"))
    floats += model.embed_tokens.weight[0].nbytes
    experts = [m for m in model.modules() if type(m).__name__ in ("QuantExperts", "Experts")]
    all_experts = sum(sum(b.nbytes for b in m.buffers()) + sum(p.nbytes for p in m.parameters()) for m in experts)
    if not counted:  # float weights: the experts are parameters; a token reads K of E of them
        routed = all_experts * cfg.num_experts_per_tok // (cfg.n_routed_experts or 1)
        floats -= all_experts
        counted = routed
    else:
        routed = counted - sum(m.bytes_read for m in model.modules()
                               if hasattr(m, "bytes_read") and m not in experts)
    cache = context * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2 * cfg.num_hidden_layers
    total = counted + floats + cache
    return {"total": total, "weight_bytes": counted + floats, "routed": routed, "cache": cache,
            "all_experts_total": total - routed + all_experts}


def reset_counters(model: torch.nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "bytes_read"):
            m.bytes_read = 0


def qdir(args: argparse.Namespace, w: str) -> Path:
    return Path(args.work) / f"{Path(args.model).name}-{w}"


def quantize_phase(args: argparse.Namespace) -> dict:
    """`dsv2 quantize` (one module at a time), then optionally the streamed load from the bf16 folder."""
    torch.set_num_threads(args.threads)
    out: dict = {}
    t0 = time.perf_counter()
    quantize_folder(args.model, qdir(args, args.one), args.one, args.group_size)
    out["quantize_s"], out["quantize_peak_gib"] = time.perf_counter() - t0, peak_rss_gib()
    out["folder_gib"] = sum(f.stat().st_size for f in qdir(args, args.one).glob("*.safetensors")) / 2**30
    if args.stream_load:  # from_pretrained(bf16 folder, weights=W): the quantised model built in memory
        t0 = time.perf_counter()
        DeepseekV2.from_pretrained(args.model, weights=args.one, group_size=args.group_size)
        out["stream_load_s"], out["stream_load_peak_gib"] = time.perf_counter() - t0, peak_rss_gib()
    return out


@torch.no_grad()  # (not inference_mode: the absorbed path tracks weight versions)
def run_one(args: argparse.Namespace) -> dict:
    """One weight format, in this (child) process: load, prefill, decode, bytes, roofline."""
    torch.set_num_threads(args.threads)
    out: dict = {"weights": args.one}
    t0 = time.perf_counter()
    if args.one == "bf16":
        model = DeepseekV2.from_pretrained(args.model, dtype=torch.bfloat16)
    else:  # the quantised folder, memory-mapped: what a user of `dsv2 quantize` loads
        model = DeepseekV2.from_pretrained(qdir(args, args.one))
    out["load_s"], out["load_peak_gib"] = time.perf_counter() - t0, peak_rss_gib()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen)
    model(prompt[:, :16], cache=DenseCache())  # warm-up
    t0 = time.perf_counter()
    model(prompt, cache=DenseCache())
    out["prefill_tok_s"] = args.prompt / (time.perf_counter() - t0)
    cache = DenseCache()
    ctx = torch.randint(0, vocab, (1, args.context), generator=gen)
    for i in range(0, args.context, 512):  # the 1K context, prefilled in 512-token pieces
        model(ctx[:, i:i + 512], cache=cache)
    base = {k: v for k, v in cache.layers.items()}
    tok = torch.randint(0, vocab, (1, 1), generator=gen)

    def step() -> None:
        cache.layers = dict(base)  # decode at the same position each time: one token after the context
        model(tok, cache=cache, attn_impl="absorbed")

    probe = torch.ones(2**28)  # 1 GiB fp32: read bandwidth, timed between the decode steps
    best = timed_rounds({"decode": (step, args.steps), "bw": (lambda: probe.sum(), args.steps)})
    reset_counters(model)
    step()
    out.update(bytes_per_token(model, args.context))
    out["decode_tok_s"] = 1.0 / best["decode"]
    out["read_gb_s"] = probe.nbytes / best["bw"] / 1e9
    out["roofline_tok_s"] = out["read_gb_s"] * 1e9 / out["total"]
    out["peak_gib"] = peak_rss_gib()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a bf16 hub folder (default: write a random one with dsv2 init)")
    ap.add_argument("--layers", type=int, default=27, help="layers of the random V2-Lite (default 27: the real one)")
    ap.add_argument("--work", default="runs/full_model", help="where the random and quantised folders go")
    ap.add_argument("--weights", nargs="+", default=["int8", "int4"], choices=("int8", "int4", "bf16"))
    ap.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128)")
    ap.add_argument("--prompt", type=int, default=512, help="prefill prompt tokens (default 512)")
    ap.add_argument("--context", type=int, default=1024, help="decode context tokens (default 1024)")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps (best taken; default 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--stream-load", action="store_true",
                    help="also time from_pretrained(bf16 folder, weights=W), which holds the quantised model in RAM")
    ap.add_argument("--reuse", action="store_true", help="use the quantised folders already in --work")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one format, one phase, JSON out
    ap.add_argument("--phase", default="run", choices=("quantize", "run"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print("RESULT " + json.dumps(quantize_phase(args) if args.phase == "quantize" else run_one(args)), flush=True)
        return
    print(f"machine: {machine()}")
    if args.model is None:
        args.model = str(Path(args.work) / f"v2lite-{args.layers}L-bf16")
        if not (Path(args.model) / "config.json").exists():
            t0 = time.perf_counter()
            n = write_random_checkpoint(lite(args.layers), args.model, dtype=torch.bfloat16)
            print(f"dsv2 init: {n / 2**30:.2f} GiB written in {time.perf_counter() - t0:.0f} s, "
                  f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    cfg = ModelConfig.from_json(args.model)
    print(f"model: {args.model}: {cfg.num_hidden_layers} layers, {cfg.num_parameters() / 1e9:.2f}B parameters; "
          f"prefill {args.prompt} tokens, decode at {args.context} tokens of context", flush=True)
    rows = []
    for w in args.weights:
        r: dict = {}
        reuse = args.reuse and (qdir(args, w) / "config.json").exists()
        for phase in (("quantize", "run") if w != "bf16" and not reuse else ("run",)):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--model", args.model, "--one", w, "--phase", phase]
            res = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode or not line:
                print(f"{w} {phase}: failed (exit {res.returncode}):\n{res.stderr[-3000:]}", flush=True)
                break
            r.update(json.loads(line[0].removeprefix("RESULT ")))
            if phase == "quantize":
                extra = (f"; from_pretrained(bf16, weights={w}) {r['stream_load_s']:.0f} s, peak RSS "
                         f"{r['stream_load_peak_gib']:.2f} GiB" if "stream_load_s" in r else "")
                print(f"{w}: dsv2 quantize {r['quantize_s']:.0f} s, peak RSS {r['quantize_peak_gib']:.2f} GiB, "
                      f"folder {r['folder_gib']:.2f} GiB{extra}", flush=True)
        if "decode_tok_s" in r:
            rows.append(r)
            print(f"{w}: load {r['load_s']:.1f} s (memory-mapped), peak RSS {r['load_peak_gib']:.2f} GiB after "
                  f"load, {r['peak_gib']:.2f} GiB after prefill + decode", flush=True)
    if not rows:
        return
    print(f"\n{'weights':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'MB/token':>9} {'(64 experts)':>13} "
          f"{'read GB/s':>10} {'roofline tok/s':>15} {'of roofline':>12}")
    for r in rows:
        print(f"{r['weights']:>8} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.2f} {r['total'] / 1e6:>9.0f} "
              f"{r['all_experts_total'] / 1e6:>13.0f} {r['read_gb_s']:>10.1f} {r['roofline_tok_s']:>15.2f} "
              f"{r['decode_tok_s'] / r['roofline_tok_s']:>11.0%}")
    routed = ", ".join(f"{r['weights']} {r['routed'] / 1e6:.0f} MB" for r in rows)
    print(f"\nMB/token: weights read by one decode token (routed experts as counted by the modules: {routed}) "
          "+ float weights + KV cache; (64 experts): the same if every routed expert were read.")


if __name__ == "__main__":
    main()
