"""`dsv2 generate`: flags and the command, handed to src/dsv2/cli.py (which only dispatches).

    dsv2 generate --model DIR --prompt "To be, or not to be" --max-new-tokens 64 --temperature 0.8

Reads config.json + safetensors and tokenizer.json from DIR, streams the text of a single prompt as it
is generated (several --prompt flags run as one continuous batch), then prints the measured tokens/s
and the KV cache size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dsv2.engine.quant import CACHE_DTYPES
from dsv2.units import DTYPES


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag to generate for several prompts in one batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (per request)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the config's eos_token_id")
    add_engine_args(p)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine and checkpoint-loading flags (shared with `dsv2 serve`)."""
    p.add_argument("--kv-cache-dtype", default="auto", choices=CACHE_DTYPES,
                   help="cache storage: auto (= model dtype), fp32, bf16, fp16, fp8, int8, int4, or mixed "
                   "(int4 latent + bf16 k_R, <= 6 bits/element)")
    p.add_argument("--kv-rope-bf16", action="store_true", help="keep k_R in bf16 when the latent is quantised")
    p.add_argument("--kv-memory", default=None, help="cache budget, e.g. 4GiB (default: enough for the batch)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="weight dtype; auto = fp32 below 1B parameters, else bf16")
    p.add_argument("--weights", default=None, choices=("bf16", "int8", "int4"),
                   help="weight format: int8 (per channel) or int4 (per group) quantise every Linear and the "
                   "experts while loading (the float model never exists); default: as stored in --model "
                   "(a `dsv2 quantize` folder loads quantised)")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128, 256 (default 128)")
    p.add_argument("--int8-activations", action="store_true",
                   help="int8/int4 weights only: round activations to int8 per 32 values (llama.cpp's Q8_0 "
                   "rounding) and multiply by integer dot products: 1.1-1.8x faster products on AVX2 CPUs; "
                   "results differ from the exact product (README: 'int8 activations')")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--compile", action="store_true",
                   help="decode steps as one torch.compile'd graph of the whole forward (inductor, C++): "
                   "several times faster on small models; each new batch / context bucket compiles first "
                   "(about a minute on 2 cores)")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens of one request per engine step (bounds activation memory; default 2048). "
                        "Prompts longer than this show a prefill progress bar on stderr")
    p.add_argument("--max-batch", type=int, default=64, help="sequences running at once (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens computed per engine step, decodes first (default 2048)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached blocks of shared prefixes")
    p.add_argument("--show-config", action="store_true", help="print the engine's settings (EngineConfig) first")
    p.add_argument("--no-resident", action="store_true", help="leave memory-mapped weights as file pages "
                   "(default: copy them into RAM, so that the page cache cannot evict them between steps; "
                   "the token embedding, read a row per token, stays mapped)")
    p.add_argument("--resident-embedding", action="store_true", help="copy the token embedding into RAM too "
                   "(0.4 GiB for DeepSeek-V2's vocabulary): no page faults, or disk reads where the kernel evicted its "
                   "file pages, when a prompt brings token ids not seen before")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, capped at "
                   "the cores idle now: more threads than idle cores make every step wait for the slowest)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig fields from the engine flags (`add_engine_args`), shared by generate and serve."""
    return dict(kv_cache_dtype=args.kv_cache_dtype, kv_memory=args.kv_memory, max_batch=args.max_batch,
                max_num_batched_tokens=args.max_num_batched_tokens, prefix_caching=not args.no_prefix_caching,
                rope_bf16=args.kv_rope_bf16, compile=args.compile, prefill_chunk=args.prefill_chunk,
                resident=not args.no_resident, resident_embedding=args.resident_embedding,
                int8_activations=args.int8_activations)


def _pick_dtype(name: str, n_params: int, quantised: bool = False) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    # int8/int4 kernels run with bf16 activations (fp32 ones are several times slower)
    return torch.float32 if n_params < 1_000_000_000 and not quantised else torch.bfloat16


def load_checkpoint(folder: Path, cfg, dtype_name: str = "auto", device_name: str | None = None,
                    weights: str | None = None, group_size: int | None = None):
    """(model, tokenizer, dtype, device) of a checkpoint folder with a tokenizer.json. weights / group_size:
    as `DeepseekV2.from_pretrained` (a ValueError names a bad or conflicting choice)."""
    from tokenizers import Tokenizer

    from dsv2.model import DeepseekV2

    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    quantised = weights in ("int8", "int4") or "quantization_config" in cfg.extra
    dtype = _pick_dtype(dtype_name, cfg.num_parameters(), quantised)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = DeepseekV2.from_pretrained(folder, dtype=dtype, device=device, weights=weights, group_size=group_size)
    return model, tokenizer, dtype, device


def run_generate(args: argparse.Namespace) -> int:
    from dsv2.checkpoint import read_config
    from dsv2.engine import Engine, SamplingParams

    folder = Path(args.model)
    tok_file = folder / "tokenizer.json"
    if not tok_file.exists():
        print(f"error: no tokenizer.json in {folder}", file=sys.stderr)
        return 2
    try:
        cfg = read_config(folder)  # (a quantised folder's config too)
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed,
            stop_token_ids=() if args.ignore_eos or cfg.eos_token_id is None else (cfg.eos_token_id,))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dsv2.threads import ThreadCountError, pick_threads

    try:
        torch.set_num_threads(pick_threads(args.threads))
    except ThreadCountError as e:
        print(f"error: --threads: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        model, tokenizer, dtype, device = load_checkpoint(folder, cfg, args.dtype, args.device, args.weights,
                                                          args.group_size)
    except ValueError as e:  # a bad --weights / --group-size, or one that conflicts with a quantised folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    budget_tokens = len(args.prompt) * (max(len(tokenizer.encode(p).ids) for p in args.prompt)
                                        + args.max_new_tokens)
    try:
        engine = Engine(model, **{**engine_kwargs(args),
                                  "max_tokens": None if args.kv_memory else max(budget_tokens, 64)})
        if args.show_config:
            print(f"engine:\n{engine.config.describe()}", file=sys.stderr)
        prompts = [tokenizer.encode(p).ids for p in args.prompt]
        for p in prompts:
            engine.scheduler.check(p, params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = f"{args.weights or cfg.extra.get('quantization_config', {}).get('weights', 'float')} weights, "
    if engine.config.int8_activations:
        fmt += "int8 activations, "
    print(f"[{cfg.num_parameters() / 1e6:.1f}M parameters, {fmt}{dtype}, {device}, "
          f"{torch.get_num_threads()} threads, loaded in {load_s:.1f}s]",
          file=sys.stderr)
    t0 = time.perf_counter()
    outs: list[list[int]] = [[] for _ in prompts]
    shown = ""
    bar = _PrefillBar(max(map(len, prompts)) > args.prefill_chunk)
    try:
        for ev in engine.stream(prompts, params, on_step=bar.update):
            if ev.finish_reason == "error":
                print(f"\nerror: request {ev.index} failed: {ev.error}", file=sys.stderr)
                return 1
            outs[ev.index].append(ev.token)
            if len(prompts) == 1:  # stream the text: print what the new token added to the decoded string
                text = tokenizer.decode(outs[0])
                if text.startswith(shown):
                    print(text[len(shown):], end="", flush=True)
                    shown = text
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    if len(prompts) == 1:
        print()
    else:
        for p, o in zip(args.prompt, outs):
            print(f"--- {p!r}\n{tokenizer.decode(o)}")
    st, rep = engine.stats, engine.cache_report()
    n = sum(len(o) for o in outs)
    print(f"[{n} tokens in {wall:.2f}s: {n / wall:.1f} tokens/s overall, decode {st.decode_tokens_per_s:.1f} "
          f"tokens/s, prefill {st.prefill_tokens} tokens in {st.prefill_s:.2f}s]", file=sys.stderr)
    print(f"[KV cache {rep['kv_cache_dtype']}: {rep['bytes_per_token']} bytes/token "
          f"({rep['bits_per_element']} bits/element), {rep['cache_bytes'] / 2**20:.2f} MiB allocated for "
          f"{rep['capacity_tokens']} tokens; used {n + sum(map(len, prompts))} tokens = "
          f"{(n + sum(map(len, prompts))) * rep['bytes_per_token'] / 2**20:.3f} MiB]", file=sys.stderr)
    return 0


class _PrefillBar:
    """A tqdm bar on stderr over the prompts' prefill work, shown only for prompts longer than a chunk
    (they produce no token for a while); closed once every prompt is prefilled."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc="prefill", unit="%", file=sys.stderr, leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def update(self, reqs: list) -> None:
        if self.bar is None:
            return
        # a request that finished or failed counts as prefilled
        done = sum(1.0 if r.status in ("finished", "failed") else r.prefill_progress for r in reqs) / len(reqs)
        self.bar.update(round(100 * done) - self.bar.n)
        if done >= 1.0:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv2 generate", description="Generate with the dsv2 engine.")
    add_generate_args(p)
    return run_generate(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
