"""Decode speed, one process, same random weights: dsv2 absorbed vs expanded vs transformers vs MHA.

V2-Lite attention shape (hidden 2048, 16 heads, d_c 512, d_R 64, dense FFN 10944, vocab 102400),
2 dense layers, bf16, batch 1. For each context S the cache is filled with the same synthetic rows
(normalised latents) in every implementation -- a 32K prefill on 2 cores would take longer than the
whole benchmark -- then one token is decoded at position S, several times, median reported.

    python benchmarks/decode.py                      # 1K 4K 8K 32K, a few minutes on 2 cores
    python benchmarks/decode.py --contexts 1024 4096 --hf-steps 1

Also measured in the same run: this machine's GEMM FLOP/s and memory read bandwidth, giving each
implementation's roofline fraction = (max(bytes/BW, flops/FLOPS) per step) / measured time per step.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import torch

from dsv2.config import ModelConfig
from dsv2.engine import Engine
from dsv2.model import DeepseekV2


def lite_shape(layers: int = 2, attention_type: str = "mla") -> ModelConfig:
    return ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=layers, n_routed_experts=None,
                                   n_shared_experts=None, num_experts_per_tok=None,
                                   attention_type=attention_type)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, steps: int) -> float:
    """Median seconds of `steps` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def machine_roofline() -> tuple[float, float]:
    """(GEMM FLOP/s at the model dtype's best, memory read bytes/s), measured now."""
    a = torch.randn(2048, 2048)
    flops = 2 * 2048**3 / timed(lambda: a @ a, 5)
    ab = a.bfloat16()
    flops = max(flops, 2 * 2048**3 / timed(lambda: ab @ ab, 3))
    big = torch.randn(128 * 2**20)  # 512 MiB: far past every cache level
    bw = big.numel() * 4 / timed(lambda: big.sum(), 5)
    w = torch.randn(16384, 8192, dtype=torch.bfloat16)  # 256 MiB GEMV: what decode actually does
    x = torch.randn(1, 8192, dtype=torch.bfloat16)
    bw = max(bw, w.numel() * 2 / timed(lambda: torch.nn.functional.linear(x, w), 5))
    del big, w
    return flops, bw


def synthetic_rows(cfg: ModelConfig, s: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Per layer (S, W) rows shaped like real ones: RMS-normalised latent, unit-scale rope part."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, cfg.kv_elements_per_token_per_layer(), generator=g).to(dtype)
            for _ in range(cfg.num_hidden_layers)]


def dsv2_step_fn(engine: Engine, rows: list[torch.Tensor]):
    """Fill a sequence of len(rows[0]) tokens, then return a function that decodes one token at S."""
    cache, s = engine.cache, rows[0].shape[0]
    seq = cache.reserve(s + 1)
    for i, r in enumerate(rows):
        cache.write(i, cache.slots(seq, 0, s), r)

    def step() -> None:
        seq.length = s  # decode position S every time: same work per call
        engine.runner.decode([seq], [7])
    return step, seq


def hf_model_from(model: DeepseekV2):
    """transformers DeepseekV2ForCausalLM sharing dsv2's weight tensors (no copy)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    hf_cfg = DeepseekV2Config(**model.config.to_dict())
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = DeepseekV2ForCausalLM(hf_cfg)
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, assign=True, strict=True)
    # rotary buffers were created on meta: rebuild them on the CPU
    rot = hf.model.rotary_emb
    inv, scale = rot.rope_init_fn(rot.config, torch.device("cpu"))
    rot.inv_freq, rot.original_inv_freq, rot.attention_scaling = inv, inv, scale
    return hf.to(model.lm_head.weight.dtype).eval()


def hf_step_fn(hf, rows: list[torch.Tensor], c: int):
    from transformers import DynamicCache

    s = rows[0].shape[0]

    def fresh() -> DynamicCache:
        cache = DynamicCache(config=hf.config)
        for i, r in enumerate(rows):
            cache.update(r[None, None, :, :c], r[None, None, :, c:], i)  # (1,1,S,C), (1,1,S,R)
        return cache

    state = {"cache": fresh()}
    ids, pos = torch.tensor([[7]]), torch.tensor([[s]])

    def step() -> None:
        cache = state["cache"]
        if cache.get_seq_length() != s:
            cache.crop(s)
        with torch.inference_mode():
            hf(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
    return step


def step_cost(model: DeepseekV2, s: int, bytes_per_token: int, impl: str) -> tuple[float, float]:
    """(bytes, flops) one decode step must touch: weights (all but the embedding) + the cache."""
    cfg = model.config
    el = model.lm_head.weight.element_size()
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("embed_tokens"))
    nbytes = params * el + s * bytes_per_token
    h, c, r = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if impl == "absorbed":
        attn = 2 * h * s * (c + r + c)
    elif impl == "expanded":  # decompress S tokens, then per-head attention
        attn = 2 * s * c * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + 2 * h * s * (cfg.qk_head_dim + cfg.v_head_dim)
        nbytes += 2 * s * h * (cfg.qk_head_dim + cfg.v_head_dim) * el  # the decompressed K/V, written once
    else:  # mha
        attn = 2 * h * s * 2 * cfg.head_dim
    return nbytes, 2 * params + attn * cfg.num_hidden_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    ap.add_argument("--steps", type=int, default=10, help="timed steps for dsv2 absorbed and MHA")
    ap.add_argument("--hf-steps", type=int, nargs="+", default=[3, 2, 1, 1],
                    help="timed steps for transformers and dsv2 expanded, per context (last one repeats)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = ap.parse_args()
    torch.manual_seed(0)
    dt = torch.bfloat16
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    flops, bw = machine_roofline()
    print(f"machine: GEMM {flops / 1e9:.1f} GFLOP/s (best of fp32/bf16), read bandwidth {bw / 1e9:.1f} GB/s")

    cfg = lite_shape(args.layers)
    model = DeepseekV2(cfg, dtype=dt).eval()
    s_max = max(args.contexts) + 8
    eng = Engine(model, kv_cache_dtype="bf16", max_tokens=s_max)
    eng_x = Engine(model, kv_cache_dtype="bf16", max_tokens=s_max, decode_impl="expanded")
    hf = None if args.no_hf else hf_model_from(model)
    mha_model = DeepseekV2(lite_shape(args.layers, "mha"), dtype=dt).eval()
    mha = Engine(mha_model, kv_cache_dtype="bf16", max_tokens=s_max)
    print(f"KV bytes/token: MLA {eng.cache.bytes_per_token} (= (512+64) x {args.layers} layers x 2 B), "
          f"MHA {mha.cache.bytes_per_token} ({mha.cache.bytes_per_token / eng.cache.bytes_per_token:.1f}x)")
    print(f"weights loaded; peak RSS {peak_rss_gib():.2f} GiB\n")

    hdr = (f"{'context':>8} {'absorbed ms':>12} {'expanded ms':>12} {'transformers ms':>16} {'MHA ms':>8} "
           f"{'HF/abs':>8} {'exp/abs':>8} {'MHA/abs':>8} {'abs roofline':>13} {'peak RSS GiB':>13}")
    print(hdr)
    results = []
    for k, s in enumerate(args.contexts):
        hf_steps = args.hf_steps[min(k, len(args.hf_steps) - 1)]
        rows = synthetic_rows(cfg, s, dt, seed=s)
        step, seq = dsv2_step_fn(eng, rows)
        t_abs = timed(step, args.steps)
        eng.cache.release(seq)
        step, seq = dsv2_step_fn(eng_x, rows)
        t_exp = timed(step, hf_steps)
        eng_x.cache.release(seq)
        t_hf = float("nan")
        if hf is not None:
            t_hf = timed(hf_step_fn(hf, rows, cfg.kv_lora_rank), hf_steps)
        del rows
        gc.collect()
        rows = synthetic_rows(mha_model.config, s, dt, seed=s)
        step, seq = dsv2_step_fn(mha, rows)
        t_mha = timed(step, args.steps)
        mha.cache.release(seq)
        del rows, step
        gc.collect()
        nb, fl = step_cost(model, s, eng.cache.bytes_per_token, "absorbed")
        roof = max(nb / bw, fl / flops) / t_abs
        results.append((s, t_abs, t_exp, t_hf, t_mha, roof))
        print(f"{s:>8} {t_abs * 1e3:>12.2f} {t_exp * 1e3:>12.1f} {t_hf * 1e3:>16.1f} {t_mha * 1e3:>8.2f} "
              f"{t_hf / t_abs:>7.1f}x {t_exp / t_abs:>7.1f}x {t_mha / t_abs:>7.2f}x {roof:>12.0%} "
              f"{peak_rss_gib():>13.2f}", flush=True)
    print("\nabsorbed step: bytes = weights (all but embedding) + S x KV bytes/token; roofline time ="
          " max(bytes/BW, FLOPs/GEMM rate); fraction = roofline time / measured time.")


if __name__ == "__main__":
    main()
