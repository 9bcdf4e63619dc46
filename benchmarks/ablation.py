"""Attention ablation (DeepSeek-V2 Appendix D at toy scale): MLA vs MHA vs GQA vs MQA.

    .venv/bin/python benchmarks/ablation.py                    # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/ablation.py --steps 100 --seeds 0   # a quick look

Dense models (no MoE, so only attention differs) trained on tinyshakespeare with `dsv2 train`'s
loop, same tokenizer, data order, tokens and schedule for every variant. Parameters are matched by
widening/narrowing the dense FFN (intermediate_size) so every variant has the MHA model's parameter
count to within 0.5%. Prints a markdown table (val loss mean ± half-range over seeds, bits per byte,
KV-cache bytes per token in bf16, parameters, tokens/s) and writes one PNG of the validation curves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from dsv2 import ModelConfig
from dsv2.train.trainer import TrainArgs, prepare, train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VARIANTS = ("mla", "mha", "gqa", "mqa")


def base_overrides(d: int, layers: int, heads: int) -> dict:
    hd = d // heads
    return dict(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                intermediate_size=4 * d, baseline_head_dim=hd, qk_nope_head_dim=hd, v_head_dim=hd,
                qk_rope_head_dim=hd // 2, kv_lora_rank=2 * hd, q_lora_rank=None, rope_scaling=None,
                max_position_embeddings=2048)


def variant_config(variant: str, over: dict, vocab: int) -> dict:
    """Overrides for one variant with intermediate_size chosen to match the MHA parameter count."""
    def cfg_for(att: str, inter: int) -> ModelConfig:
        kv = {"gqa": over["num_attention_heads"] // 2, "mqa": 1}.get(att, over["num_attention_heads"])
        return ModelConfig.from_preset("small", **{**over, "intermediate_size": inter, "attention_type": att,
                                                   "num_key_value_heads": kv, "vocab_size": vocab,
                                                   "n_routed_experts": None, "n_shared_experts": None,
                                                   "num_experts_per_tok": None})
    target = cfg_for("mha", over["intermediate_size"]).num_parameters()
    c = cfg_for(variant, over["intermediate_size"])
    per_unit = 3 * c.hidden_size * c.num_hidden_layers  # params per unit of intermediate_size
    inter = over["intermediate_size"] + round((target - c.num_parameters()) / per_unit)
    c = cfg_for(variant, inter)
    return {"intermediate_size": inter, "num_key_value_heads": c.num_key_value_heads, "config": c}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=str(REPO / "runs" / "ablation"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if not Path(a.data).exists():
        raise SystemExit(f"ablation: {a.data} not found (pass --data PATH)")
    out = Path(a.out)
    over = base_overrides(a.hidden, a.layers, a.heads)
    runs: dict[str, list[dict]] = {v: [] for v in a.variants}
    t_start = time.time()
    tokenizer: str | None = None
    out.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        for v in a.variants:  # interleaved so machine noise spreads over all variants
            vc = variant_config(v, over, a.vocab_size)
            o = {**over, "intermediate_size": vc["intermediate_size"],
                 "num_key_value_heads": vc["num_key_value_heads"]}
            args = TrainArgs(preset="small", data=[a.data], out=str(out / f"{v}-seed{seed}"), steps=a.steps,
                             attention=v, kv_heads=vc["num_key_value_heads"] if v == "gqa" else None,
                             dense=True, override=o, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr,
                             vocab_size=a.vocab_size, eval_every=a.eval_every, eval_batches=a.eval_batches,
                             seed=seed, progress=False, log_every=10**9, threads=a.threads, schedule="step",
                             tokenizer=tokenizer)
            prep = prepare(args)
            if tokenizer is None:  # every run shares the first run's (deterministic) tokenizer
                tokenizer = str(out / "tokenizer.json")
                prep.tok.save(tokenizer)
            s = train(prep)
            hist = [(h["step"], h["val_loss"]) for h in json.loads(
                "[" + ",".join((out / f"{v}-seed{seed}" / "metrics.jsonl").read_text().splitlines()) + "]")
                if "val_loss" in h]
            cfg = prep.cfg
            runs[v].append({"seed": seed, "val_loss": s["val_loss"], "val_bpb": s["val_bpb"],
                            "tok_s": s["tok_s"], "params": s["params"], "curve": hist,
                            "kv_bytes": 2 * cfg.kv_elements_per_token_per_layer() * cfg.num_hidden_layers,
                            "kv_heads": cfg.kv_heads, "intermediate_size": cfg.intermediate_size})
            print(f"[{time.time() - t_start:6.0f}s] {v} seed {seed}: val {s['val_loss']:.4f} "
                  f"bpb {s['val_bpb']:.4f} {s['tok_s']:.0f} tok/s", flush=True)
    (out / "results.json").write_text(json.dumps(runs, indent=2))
    table = render_table(runs, a)
    print("\n" + table)
    (out / "results.md").write_text(table + "\n")
    plot(runs, out / "ablation_val_curves.png", a)
    print(f"\nplot: {out / 'ablation_val_curves.png'}   total {time.time() - t_start:.0f}s")


def _mean_pm(xs: list[float]) -> str:
    m = statistics.fmean(xs)
    return f"{m:.4f} ± {(max(xs) - min(xs)) / 2:.4f}" if len(xs) > 1 else f"{m:.4f}"


def render_table(runs: dict[str, list[dict]], a: argparse.Namespace) -> str:
    lines = [f"{a.steps} steps x {a.batch_size} x {a.seq_len} tokens, seeds {a.seeds}, dense, d={a.hidden}, "
             f"{a.layers} layers, {a.heads} heads (val: mean ± half-range over seeds)", "",
             "| attention | KV heads | FFN width | params | KV bytes/token (bf16) | val loss | val bits/byte "
             "| tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for v, rs in runs.items():
        r0 = rs[0]
        kvh = "latent" if v == "mla" else str(r0["kv_heads"])
        lines.append(f"| {v.upper()} | {kvh} | {r0['intermediate_size']} | {r0['params'] / 1e6:.3f}M | "
                     f"{r0['kv_bytes']} | {_mean_pm([r['val_loss'] for r in rs])} | "
                     f"{_mean_pm([r['val_bpb'] for r in rs])} | {statistics.fmean(r['tok_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path, a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for v, rs in runs.items():
        steps = [s for s, _ in rs[0]["curve"]]
        vals = [[c[i][1] for c in (r["curve"] for r in rs)] for i in range(len(steps))]
        mean = [statistics.fmean(x) for x in vals]
        ax.plot(steps, mean, "o-", ms=2.5, lw=1.3, label=v.upper())
        ax.fill_between(steps, [min(x) for x in vals], [max(x) for x in vals], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"attention ablation, tinyshakespeare, {len(a.seeds)} seeds (band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend()
    lo = min(min(v for _, v in r["curve"][len(r["curve"]) // 3:]) for rs in runs.values() for r in rs)
    hi = max(max(v for _, v in r["curve"][len(r["curve"]) // 3:]) for rs in runs.values() for r in rs)
    ax.set_ylim(lo - 0.05, hi + 0.1)  # zoom on the part of training where the variants separate
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
