"""Training tokens/s: dsv2 vs transformers' DeepseekV2ForCausalLM, same loop, config, weights, batch, dtype.

    .venv/bin/python benchmarks/train_speed.py                 # ~20M-param MoE, batch 8 x 256, bf16 autocast
    .venv/bin/python benchmarks/train_speed.py --dtype fp32 --steps 5

Both models get identical weights (transformers loads the folder dsv2 writes) and run the same step:
forward under autocast -> cross-entropy (+ dsv2's balance losses, as `dsv2 train` does) -> backward ->
clip 1.0 -> AdamW (0.9, 0.95), wd 0.1. Rounds alternate between the two models so machine noise hits
both alike; the best round of each is reported along with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from dsv2 import DeepseekV2, ModelConfig
from dsv2.train.optim import build_optimizer


def bench_config(vocab: int = 8192) -> ModelConfig:
    """~20M parameters: MLA with q compression, 1 dense + 5 MoE layers of 1 shared + 8 routed, top-2."""
    return ModelConfig.from_preset(
        "small", vocab_size=vocab, hidden_size=320, num_hidden_layers=6, num_attention_heads=5,
        num_key_value_heads=5, intermediate_size=1024, kv_lora_rank=128, q_lora_rank=192,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=256, topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, aux_loss_alpha=0.001)


def run_round(model, step_fn, batches: list[torch.Tensor], warmup: int, dtype: str) -> float:
    """Tokens/s over len(batches) - warmup timed steps."""
    opt = build_optimizer(model, 3e-4)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else None
    t0, n_tok = 0.0, 0
    for i, rows in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        ids, tgt = rows[:, :-1], rows[:, 1:]
        if ctx is not None:
            with ctx():
                loss = step_fn(model, ids, tgt)
        else:
            loss = step_fn(model, ids, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            n_tok += ids.numel()
    return n_tok / (time.perf_counter() - t0)


def dsv2_step(model, ids, tgt):
    logits, aux = model(ids, return_aux=True)
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten()) + aux["aux_loss"]


def dsv2_step_noaux(model, ids, tgt):
    return F.cross_entropy(model(ids).float().flatten(0, 1), tgt.flatten())


def hf_step(model, ids, tgt):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    cfg = bench_config()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1), generator=g)
               for _ in range(a.warmup + a.steps)]
    ref = DeepseekV2(cfg, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        load = {
            "dsv2": lambda: DeepseekV2.from_pretrained(tmp, dtype=torch.float32),
            "transformers": lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32),
        }
        steps = {"dsv2": dsv2_step, "dsv2 (no aux)": dsv2_step_noaux, "transformers": hf_step}
        results: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(a.rounds):
            for name, fn in steps.items():
                model = load["transformers" if name == "transformers" else "dsv2"]()
                model.train()
                results[name].append(run_round(model, fn, batches, a.warmup, a.dtype))
                print(f"round {r + 1} {name:<14} {results[name][-1]:8.0f} tok/s", flush=True)
                del model
    n = cfg.num_parameters()
    print(f"\nconfig: {n / 1e6:.1f}M params, MLA q_lora {cfg.q_lora_rank}, {cfg.n_shared_experts} shared + "
          f"{cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok}, batch {a.batch_size} x "
          f"{a.seq_len}, {a.dtype} {'autocast' if a.dtype == 'bf16' else ''}, AdamW, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    best = {k: max(v) for k, v in results.items()}
    for k, v in results.items():
        print(f"  {k:<14} best {best[k]:8.0f} tok/s  (median {statistics.median(v):.0f})")
    print(f"ratio dsv2 / transformers: {best['dsv2'] / best['transformers']:.2f}x "
          f"(without the balance losses: {best['dsv2 (no aux)'] / best['transformers']:.2f}x)")


if __name__ == "__main__":
    main()
