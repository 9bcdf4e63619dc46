"""Decode speed, one process, same random weights: dsv2 (engine step, absorbed over the latent in place)
vs dsv2 "gathered" (one padded batch through the model's attend_absorbed) vs transformers vs MHA.

V2-Lite attention shape (hidden 2048, 16 heads, d_c 512, d_R 64, dense FFN 10944, vocab 102400),
2 dense layers, bf16, batch 1. For each context S the cache is filled with the same synthetic rows
(normalised latents) in every implementation -- a 32K prefill on 2 cores would take longer than the
whole benchmark -- then one token is decoded at position S, several times, best of N interleaved calls.

--compare-ref also times the decode path the engine had before issue 9 (`_legacy_runner.LegacyRunner
.decode`, a benchmark-only copy of the old runner's batch-1 fast path) over the *same* cache and
sequence as the engine's step, in pairs alternating which goes first, and prints new / old (< 1: the
engine is faster) of the best times and the median of the per-pair ratios (steadier on a loaded machine).

    python benchmarks/decode.py                      # 1K 4K 8K 32K, a few minutes on 2 cores
    python benchmarks/decode.py --compare-ref --no-hf --no-gathered --no-mha --steps 60 --threads 1
    python benchmarks/decode.py --contexts 1024 4096 --hf-steps 1

Also measured in the same run: this machine's GEMM FLOP/s and memory read bandwidth, giving each
implementation's roofline fraction = (max(bytes/BW, flops/FLOPS) per step) / measured time per step.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from _common import peak_memory_gib, synced, timed_rounds, timeit
from _legacy_runner import LegacyRunner, SeqSlots
from dsv2.config import ModelConfig
from dsv2.engine import Engine
from dsv2.engine.runner import SeqWork
from dsv2.model import DeepseekV2


def lite_shape(layers: int = 2, attention_type: str = "mla") -> ModelConfig:
    # every layer dense: first_k_dense_replace = layers (transformers needs the MoE fields set)
    return ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=layers, first_k_dense_replace=layers,
                                   attention_type=attention_type)


def machine_roofline(device: torch.device) -> tuple[float, float]:
    """(best GEMM FLOP/s of fp32 / bf16, best memory read bytes/s of a sum / a bf16 GEMV), measured now."""
    a = torch.randn(2048, 2048, device=device)
    flops = 2 * 2048**3 / timeit(synced(lambda: a @ a, device), repeat=5)
    xb = torch.randn(1024, 2048, dtype=torch.bfloat16, device=device)
    wb = torch.randn(4096, 2048, dtype=torch.bfloat16, device=device)
    flops = max(flops, 2 * 1024 * 2048 * 4096 / timeit(synced(lambda: torch.nn.functional.linear(xb, wb), device),
                                                       repeat=3))
    big = torch.randn(128 * 2**20, device=device)  # 512 MiB: far past every cache level
    bw = big.numel() * 4 / timeit(synced(lambda: big.sum(), device), repeat=5)
    wv = torch.randn(16384, 8192, dtype=torch.bfloat16, device=device)  # 256 MiB GEMV: what decode actually does
    xv = torch.randn(1, 8192, dtype=torch.bfloat16, device=device)
    bw = max(bw, wv.numel() * 2 / timeit(synced(lambda: torch.nn.functional.linear(xv, wv), device), repeat=5))
    return flops, bw


def synthetic_rows(cfg: ModelConfig, s: int, dtype: torch.dtype, seed: int,
                   device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Per layer (S, W) rows shaped like real ones: RMS-normalised latent, unit-scale rope part."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, cfg.kv_elements_per_token_per_layer(), generator=g).to(device, dtype)
            for _ in range(cfg.num_hidden_layers)]


def fill(engine: Engine, rows: list[torch.Tensor]) -> SeqSlots:
    """Reserve a sequence of len(rows[0]) + 1 tokens in the engine's cache (held until `engine.held` is
    closed) and write the rows as its first S."""
    cache, s = engine.cache, rows[0].shape[0]
    if not hasattr(engine, "held"):
        engine.held = ExitStack()
    blocks = engine.held.enter_context(engine.reserve(s + 1))
    for i, r in enumerate(rows):
        cache.write(i, cache.slots(blocks, 0, s), r)
    return SeqSlots(blocks, s)


def dsv2_step_fn(engine: Engine, rows: list[torch.Tensor]):
    """Fill a sequence of len(rows[0]) tokens, then return (a function that runs one engine step decoding
    one token at position S, the sequence). Every call does the same work (it rewrites slot S)."""
    seq = fill(engine, rows)
    work = [SeqWork(seq.blocks, rows[0].shape[0], [7])]
    return (lambda: engine.runner.execute(work)[0]), seq


def legacy_step_fn(ref: LegacyRunner, seq: SeqSlots, s: int):
    """The pre-issue-9 decode of one token at position S over the same sequence."""
    def step() -> torch.Tensor:
        seq.length = s  # decode position S every time: same work per call
        return ref.decode([seq], [7])[0]
    return step


def paired(fa, fb, rounds: int) -> tuple[float, float, float]:
    """Time fa and fb back to back, `rounds` times, alternating which goes first (load from other jobs then
    hits both alike). Returns (best seconds of fa, best of fb, median over rounds of fa's time / fb's)."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for r in range(rounds):
        for fn, out in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return min(ta), min(tb), statistics.median(a / b for a, b in zip(ta, tb))


def hf_model_from(model: DeepseekV2):
    """transformers DeepseekV2ForCausalLM sharing dsv2's weight tensors (no copy)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    hf_cfg = DeepseekV2Config(**model.config.to_dict())
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = DeepseekV2ForCausalLM(hf_cfg)
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, assign=True, strict=True)
    # rotary buffers were created on meta: rebuild them, on the weights' device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)
    w = model.lm_head.weight
    return hf.to(w.device, w.dtype).eval()


def hf_step_fn(hf, rows: list[torch.Tensor], c: int):
    from transformers import DynamicCache

    s = rows[0].shape[0]

    def fresh() -> DynamicCache:
        cache = DynamicCache(config=hf.config)
        for i, r in enumerate(rows):
            cache.update(r[None, None, :, :c], r[None, None, :, c:], i)  # (1,1,S,C), (1,1,S,R)
        return cache

    state = {"cache": fresh()}
    dev = rows[0].device
    ids, pos = torch.tensor([[7]], device=dev), torch.tensor([[s]], device=dev)

    def step() -> None:
        cache = state["cache"]
        extra = cache.get_seq_length() - s
        if extra > 0:
            cache.crop(-extra)  # drop the token the previous call appended
        with torch.inference_mode():
            hf(input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
    return step


def step_cost(model: DeepseekV2, s: int, bytes_per_token: int) -> tuple[float, float]:
    """(bytes, flops) one absorbed MLA decode step must touch: weights (all but the embedding) + the cache."""
    cfg = model.config
    el = model.lm_head.weight.element_size()
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed_tokens"))
    nbytes = params * el + s * bytes_per_token
    h, c, r = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    attn = 2 * h * s * (c + r + c)  # scores over the C+R-wide latent rows, then p @ c_kv
    return nbytes, 2 * params + attn * cfg.num_hidden_layers


def kv_quality_report(model_dir: str | None, steps: int, text: str | None) -> None:
    """Quantised cache modes vs the bf16 cache: bytes/token, mean KL, greedy agreement (teacher-forced)."""
    from dsv2.engine.quality import kv_quality

    continuation = None
    if model_dir:
        model = DeepseekV2.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        what = model_dir
        tok_file = Path(model_dir) / "tokenizer.json"
        if text and tok_file.exists():  # held-out text: the last 64 + steps tokens of the file
            from tokenizers import Tokenizer

            ids = Tokenizer.from_file(str(tok_file)).encode(Path(text).read_text()[-200_000:]).ids
            prompt, continuation = ids[-(64 + steps): -steps], ids[-steps:]
            what += f", prompt and teacher-forced continuation from the end of {text}"
    else:  # V2-Lite latent dims (C 512, R 64, 16 heads) on a small trunk; sharpened so tokens are decisive
        cfg = ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=2, first_k_dense_replace=2,
                                      hidden_size=512, intermediate_size=1024, vocab_size=8192)
        model = DeepseekV2(cfg, dtype=torch.bfloat16).eval()
        model.reset_parameters(seed=0)
        with torch.no_grad():
            model.lm_head.weight.mul_(30)
            for layer in model.layers:
                layer.self_attn.q_proj.weight.mul_(8)
        what = "random V2-Lite-latent model (hidden 512, 2 layers, lm_head x30, q_proj x8)"
    if continuation is None:
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (64,), generator=g).tolist()
    fed = "held-out text" if continuation is not None else "the bf16 cache's greedy tokens"
    print(f"KV cache quality vs bf16 cache, {what}; {steps} decode steps fed {fed}")
    print(f"{'mode':>16} {'bytes/token/layer':>18} {'bits/elt':>9} {'mean KL':>10} {'greedy agree':>13}")
    for q in kv_quality(model, prompt, steps=steps, continuation=continuation):
        per_layer = q.bytes_per_token // model.config.num_hidden_layers
        print(f"{q.mode:>16} {per_layer:>18} {q.bits_per_element:>9.2f} {q.mean_kl:>10.2e} "
              f"{q.greedy_agreement:>12.1%}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    ap.add_argument("--steps", type=int, default=10, help="timed steps for dsv2 and MHA (pairs with the old path)")
    ap.add_argument("--hf-steps", type=int, nargs="+", default=[3, 2, 2, 1],
                    help="timed steps for transformers and dsv2 gathered, per context (last one repeats)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-gathered", action="store_true", help="skip dsv2's gathered decode")
    ap.add_argument("--no-mha", action="store_true", help="skip the MHA baseline")
    ap.add_argument("--compare-ref", action="store_true",
                    help="also time the pre-issue-9 decode path (benchmarks/_legacy_runner.py) over the same "
                         "cache, interleaved, and print new / old")
    ap.add_argument("--kv-quality", nargs="?", const="", default=None, metavar="MODEL_DIR",
                    help="instead: quantised cache quality vs bf16 (a checkpoint folder, or a random model)")
    ap.add_argument("--quality-steps", type=int, default=512)
    ap.add_argument("--quality-text", default=None, metavar="PATH",
                    help="with a checkpoint that has tokenizer.json: feed the end of this text file instead "
                         "of greedy tokens (e.g. the held-out end of the training corpus)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ... (the whole benchmark runs there)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other jobs on the machine skew timings)")
    if args.kv_quality is not None:
        kv_quality_report(args.kv_quality or None, args.quality_steps, args.quality_text)
        return
    torch.manual_seed(0)
    dt = torch.bfloat16
    where = f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    if args.device.startswith("cuda"):
        where = f"device {torch.cuda.get_device_name(args.device)}"
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {where}")
    dev = torch.device(args.device)
    flops, bw = machine_roofline(dev)
    print(f"machine: GEMM {flops / 1e9:.1f} GFLOP/s (best of fp32/bf16), read bandwidth {bw / 1e9:.1f} GB/s",
          flush=True)

    cfg = lite_shape(args.layers)
    model = DeepseekV2(cfg, dtype=dt, device=dev).eval()
    s_max = max(args.contexts) + 8
    eng = Engine(model, kv_cache_dtype="bf16", max_tokens=s_max)  # prepares the model (dsv2.precision)
    ref = LegacyRunner(model, eng.cache) if args.compare_ref else None  # same model, same cache
    eng_g = None if args.no_gathered else Engine(model, kv_cache_dtype="bf16", max_tokens=s_max,
                                                  decode_impl="gathered")
    hf = None if args.no_hf else hf_model_from(model)
    mha = None
    if not args.no_mha:
        mha = Engine(DeepseekV2(lite_shape(args.layers, "mha"), dtype=dt, device=dev), kv_cache_dtype="bf16",
                     max_tokens=s_max)
        print(f"KV bytes/token: MLA {eng.cache.bytes_per_token} (= (512+64) x {args.layers} layers x 2 B), "
              f"MHA {mha.cache.bytes_per_token} ({mha.cache.bytes_per_token / eng.cache.bytes_per_token:.1f}x)")
    mem = "peak RSS" if dev.type == "cpu" else f"peak {dev.type} memory"
    print(f"weights loaded; {mem} {peak_memory_gib(dev):.2f} GiB\n")

    hdr = (f"{'context':>8} {'dsv2 ms':>9} {'old ms':>9} {'new/old':>8} {'paired':>7} {'gathered ms':>12} "
           f"{'transformers ms':>16} {'MHA ms':>8} {'HF/dsv2':>8} {'gath/dsv2':>9} {'MHA/dsv2':>9} {'roofline':>9} "
           f"{'GB/s':>6} {'GFLOP/s':>8} {'peak GiB':>9}")
    print(hdr)
    nan = float("nan")
    big = torch.randn(64 * 2**20, device=dev)  # 256 MiB bandwidth probe and a GEMM probe, re-timed beside every row
    sq = torch.randn(1024, 1024, device=dev)
    for k, s in enumerate(args.contexts):
        hf_steps = args.hf_steps[min(k, len(args.hf_steps) - 1)]
        rows = synthetic_rows(cfg, s, dt, seed=s, device=dev)
        fns = {"bw": (lambda: big.sum(), args.steps), "gemm": (lambda: sq @ sq, args.steps)}
        new_step, seq = dsv2_step_fn(eng, rows)
        fns["new"] = (new_step, args.steps)
        if ref is not None:  # paired with the engine's step call by call, over the same sequence
            old_step = legacy_step_fn(ref, seq, s)
            diff = (new_step().float() - old_step().float()).abs().max().item()
            t_new_p, t_old, med = paired(synced(new_step, dev), synced(old_step, dev), args.steps)
        if mha is not None:
            fns["mha"] = (dsv2_step_fn(mha, synthetic_rows(mha.model.config, s, dt, seed=s, device=dev))[0],
                          args.steps)
        if eng_g is not None:
            fns["gath"] = (dsv2_step_fn(eng_g, rows)[0], hf_steps)
        if hf is not None:
            fns["hf"] = (hf_step_fn(hf, rows, cfg.kv_lora_rank), hf_steps)
        t = timed_rounds({name: (synced(fn, dev), n) for name, (fn, n) in fns.items()})
        for e in (e for e in (eng, eng_g, mha) if e is not None):
            e.held.close()
        del rows, fns
        gc.collect()
        t_new = t["new"]
        t_g, t_mha, t_hf = (t.get(n, nan) for n in ("gath", "mha", "hf"))
        if ref is None:
            t_old = med = best = nan
        else:
            best, t_new = t_new_p / t_old, min(t_new, t_new_p)
        bw_row = max(bw, big.numel() * 4 / t["bw"])
        flops_row = max(flops, 2 * 1024**3 / t["gemm"])
        nb, fl = step_cost(model, s, eng.cache.bytes_per_token)
        roof = max(nb / bw_row, fl / flops_row) / t_new
        print(f"{s:>8} {t_new * 1e3:>9.2f} {t_old * 1e3:>9.2f} {best:>7.3f}x {med:>6.3f}x "
              f"{t_g * 1e3:>12.1f} {t_hf * 1e3:>16.1f} {t_mha * 1e3:>8.2f} {t_hf / t_new:>7.1f}x {t_g / t_new:>8.1f}x "
              f"{t_mha / t_new:>8.2f}x {roof:>8.0%} {bw_row / 1e9:>6.1f} {flops_row / 1e9:>8.1f} "
              f"{peak_memory_gib(dev):>9.2f}" + (f"   (logits new vs old: max |diff| {diff:.2e})" if ref else ""),
              flush=True)
    print("\nbest of N interleaved calls per implementation (transformers/gathered: --hf-steps calls). dsv2 = one"
          " engine step (ModelRunner.execute) decoding one token; old = the pre-issue-9 runner's decode"
          " (benchmarks/_legacy_runner.py) over the same cache, timed in pairs before the others' rounds:"
          " new/old = ratio of the best times in those pairs, paired = median over rounds of each pair's ratio"
          " (the steadier figure on a loaded machine).")
    print("dsv2 step: bytes = weights (all but embedding) + S x KV bytes/token; roofline time ="
          " max(bytes/BW, FLOPs/GEMM rate), BW and GEMM rate = best seen (start of run or beside the row);"
          " fraction = roofline time / measured time.")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
