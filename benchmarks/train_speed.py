"""Training tokens/s: dsv2 vs transformers' DeepseekV2ForCausalLM, same loop, config, weights, batch, dtype.

    .venv/bin/python benchmarks/train_speed.py                 # ~20M-param MoE, batch 8 x 256, bf16 autocast
    .venv/bin/python benchmarks/train_speed.py --dtype fp32 --steps 5

Both models get identical weights (transformers loads the folder dsv2 writes) and run the same step:
forward under autocast -> cross-entropy (+ dsv2's balance losses, as `dsv2 train` does) -> backward ->
clip 1.0 -> AdamW (0.9, 0.95), wd 0.1. dsv2's model gets the CPU precision pass `dsv2 train` applies
(dsv2.precision.prepare: on CPUs without native bf16 GEMMs, bf16-autocast matmuls run in fp32). Steps
alternate between the two models so machine noise hits both alike; tokens/s over the timed steps of each
and the ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from dsv2 import DeepseekV2, ModelConfig
from dsv2.precision import prepare
from dsv2.train.optim import build_optimizer


def bench_config(vocab: int = 8192) -> ModelConfig:
    """~20M parameters: MLA with q compression, 1 dense + 5 MoE layers of 1 shared + 8 routed, top-2."""
    return ModelConfig.from_preset(
        "small", vocab_size=vocab, hidden_size=320, num_hidden_layers=6, num_attention_heads=5,
        num_key_value_heads=5, intermediate_size=1024, kv_lora_rank=128, q_lora_rank=192,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=256, topk_method="greedy", n_group=1, topk_group=1,
        norm_topk_prob=False, aux_loss_alpha=0.001)


class Runner:
    """One model + its AdamW; `step(rows)` runs one timed training step and returns its seconds."""

    def __init__(self, model, loss_fn, dtype: str) -> None:
        self.model, self.loss_fn, self.dtype = model, loss_fn, dtype
        self.model.train()
        self.opt = build_optimizer(model, 3e-4)
        self.times: list[float] = []

    def step(self, rows: torch.Tensor) -> float:
        ids, tgt = rows[:, :-1], rows[:, 1:]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            loss = self.loss_fn(self.model, ids, tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


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
    ap.add_argument("--steps", type=int, default=4, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    ap.add_argument("--no-aux", action="store_true", help="dsv2 without its balance losses (like transformers)")
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
        runners = {"dsv2": Runner(prepare(DeepseekV2.from_pretrained(tmp, dtype=torch.float32)),
                                  dsv2_step_noaux if a.no_aux else dsv2_step, a.dtype),
                   "transformers": Runner(transformers.AutoModelForCausalLM.from_pretrained(
                       tmp, dtype=torch.float32), hf_step, a.dtype)}
    # steps alternate between the two models (order flipped every step), so load from other
    # processes on a shared machine lands on both alike
    names = list(runners)
    for i, rows in enumerate(batches):
        order = names if i % 2 == 0 else names[::-1]
        line = []
        for name in order:
            dt = runners[name].step(rows)
            line.append(f"{name} {rows[:, 1:].numel() / dt:7.0f} tok/s")
        tag = "warm-up" if i < a.warmup else "timed"
        print(f"step {i + 1} ({tag}): " + ", ".join(line), flush=True)
    n_tok = a.batch_size * a.seq_len * a.steps
    tok_s = {k: n_tok / sum(r.times[a.warmup:]) for k, r in runners.items()}
    print(f"\nconfig: {cfg.num_parameters() / 1e6:.1f}M params, MLA q_lora {cfg.q_lora_rank}, "
          f"{cfg.n_shared_experts} shared + {cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok}, "
          f"batch {a.batch_size} x {a.seq_len}, {a.dtype}{' autocast' if a.dtype == 'bf16' else ''}, AdamW, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}"
          f"{', dsv2 without balance losses' if a.no_aux else ', dsv2 loss includes its balance losses'}")
    for k, v in tok_s.items():
        print(f"  {k:<13} {v:8.0f} tok/s  (median step {statistics.median(runners[k].times[a.warmup:]):.2f}s)")
    print(f"ratio dsv2 / transformers: {tok_s['dsv2'] / tok_s['transformers']:.2f}x")


if __name__ == "__main__":
    main()
