"""Quality of int8 / int4 weights on a trained checkpoint: held-out perplexity and greedy agreement.

    dsv2 train --preset small --steps 150 --out runs/q          # default corpus (CPython's docs)
    python benchmarks/weight_quality.py runs/q/latest

The held-out rows are the trainer's own validation split (the same tokenizer, packing, seq_len and
val_frac as the run, read from train_args.json). Every format scores the same rows, teacher-forced:
perplexity = exp(mean next-token cross-entropy); agreement = fraction of positions whose argmax equals
the bf16 model's; KL = mean KL(p_bf16 || p_format). The quantised models are loaded the way users load
them: `DeepseekV2.from_pretrained(DIR, weights=...)`, streaming from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from dsv2 import DeepseekV2
from dsv2.train.data import default_corpus, encode_documents, load_documents, load_tokenizer, pack


@torch.no_grad()
def score(model: DeepseekV2, rows: torch.Tensor, batch: int = 8) -> tuple[float, torch.Tensor]:
    """(mean cross-entropy over all positions, (N, T, V) fp32 log-probs)."""
    lps, nll, n = [], 0.0, 0
    for i in range(0, rows.shape[0], batch):
        x, y = rows[i:i + batch, :-1], rows[i:i + batch, 1:]  # (B,T)
        lp = model(x).float().log_softmax(-1)  # (B,T,V)
        nll += -lp.gather(-1, y[..., None]).sum().item()
        n += y.numel()
        lps.append(lp)
    return nll / n, torch.cat(lps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a `dsv2 train` step folder (train_args.json, tokenizer.json)")
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int4:128", "int4:64", "int4:32"])
    ap.add_argument("--max-rows", type=int, default=64, help="held-out rows scored (default 64)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(args.checkpoint).resolve()
    targs = json.loads((folder / "train_args.json").read_text())
    tok = load_tokenizer(folder)
    docs = load_documents(targs["data"], targs.get("text_key", "text")) if targs.get("data") else default_corpus()
    rows = pack(encode_documents(tok, docs), targs["seq_len"], targs["val_frac"]).val[: args.max_rows]
    print(f"{folder}: {rows.shape[0]} held-out rows x {rows.shape[1] - 1} next-token predictions")

    ref_lp = None
    print(f"{'weights':>9} {'ppl':>9} {'dPPL vs bf16':>13} {'greedy agree':>13} {'mean KL':>10} {'weight MB':>10}")
    results = {}
    for fmt in args.formats:
        name, _, group = fmt.partition(":")
        if name in ("fp32", "bf16"):
            model = DeepseekV2.from_pretrained(folder, dtype=torch.float32 if name == "fp32" else torch.bfloat16)
        else:
            model = DeepseekV2.from_pretrained(folder, dtype=torch.bfloat16, weights=name,
                                               group_size=int(group) if group else None)
        mb = sum(t.nbytes for t in model.state_dict().values()) / 1e6
        ce, lp = score(model.eval(), rows)
        results[fmt] = math.exp(ce)
        if name == "bf16":
            ref_lp = lp
        if ref_lp is None:
            print(f"{fmt:>9} {math.exp(ce):>9.3f} {'':>13} {'':>13} {'':>10} {mb:>10.1f}")
            continue
        agree = (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean().item()
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0).mean().item()
        d = results[fmt] / results["bf16"] - 1
        print(f"{fmt:>9} {results[fmt]:>9.3f} {d:>+13.2%} {agree:>13.1%} {kl:>10.2e} {mb:>10.1f}")


if __name__ == "__main__":
    main()
