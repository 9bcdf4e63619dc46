"""`make demo`: train a 6M-parameter DeepSeek-V2 (MLA + DeepSeekMoE) on the bundled CPython docs, then generate.

    python -m dsv2.train.demo                  # ~2 min on 2 idle CPU cores (val ~1.40 bits/byte)
    python -m dsv2.train.demo --steps 50       # a quicker look

The model is the `small` preset narrowed to `DEMO_MODEL` (4 layers, d 256, 8 routed experts top-2) with a
2,048-token BPE: on ~125K tokens of text, a small vocabulary and a narrow model learn far more per
CPU-second than the 24M-parameter preset with 8,192 tokens, whose samples stay word salad in minutes.

Generation goes through dsv2.engine (paged latent cache, absorbed decode) when it is importable and
falls back to a plain forward loop over the model otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dsv2.train.data import load_tokenizer, special_ids
from dsv2.train.trainer import TrainArgs, prepare, train

PROMPTS = ("The for statement", "Exceptions are raised", "A class definition", "The import statement")
DEMO_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  kv_lora_rank=64, q_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  intermediate_size=768, moe_intermediate_size=192)
DEMO_VOCAB = 2048


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dsv2.train.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


@torch.no_grad()
def plain_generate(model, prompts: Sequence[Sequence[int]], max_new: int, temperature: float, eos: int | None,
                   seed: int = 0) -> list[list[int]]:
    """Reference loop: full forward over the growing sequence each step (no cache)."""
    outs = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(seed + i)
        ids = torch.tensor([list(prompt)])
        new: list[int] = []
        for _ in range(max_new):
            logits = model(ids)[0, -1].float()  # (V,)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                top = torch.topk(probs, 40)
                nxt = int(top.indices[torch.multinomial(top.values, 1, generator=g)])
            else:
                nxt = int(logits.argmax())
            if nxt == eos:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        outs.append(new)
    return outs


def generate(model, prompts: list[list[int]], max_new: int, temperature: float, eos: int | None
             ) -> tuple[list[list[int]], str]:
    try:
        from dsv2.engine import Engine, SamplingParams

        params = [SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=40 if temperature else 0,
                                 seed=i, stop_token_ids=(eos,) if eos is not None else ())
                  for i in range(len(prompts))]
        outs = Engine(model, max_tokens=4096).generate(prompts, params)
        return [[t for t in o if t != eos] for o in outs], "dsv2.engine"
    except Exception as e:  # the engine is optional for the demo: say why and use the plain loop
        print(f"(engine unavailable: {type(e).__name__}: {e}; using the plain forward loop)", file=sys.stderr)
        return plain_generate(model, prompts, max_new, temperature, eos), "plain forward loop"


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from dsv2 import DeepseekV2

    args = TrainArgs(preset="small", override=dict(DEMO_MODEL), vocab_size=DEMO_VOCAB, steps=a.steps, out=a.out,
                     seq_len=128, batch_size=16, lr=3e-3, warmup=min(20, a.steps // 10),
                     eval_every=max(1, a.steps // 2), eval_batches=8, log_every=max(1, a.steps // 10),
                     threads=a.threads, progress=a.progress)
    print(f"dsv2 demo: training a 6M-parameter DeepSeek-V2 (MLA + DeepSeekMoE) on CPython's bundled docs for "
          f"{a.steps} steps -> {a.out}", file=sys.stderr)
    t0 = time.time()
    summary = train(prepare(args))
    folder = Path(a.out) / "latest"
    model = DeepseekV2.from_pretrained(folder, dtype=torch.float32)
    tok = load_tokenizer(folder)
    _, eos = special_ids(tok)
    prompts = [tok.encode(p).ids for p in PROMPTS]
    t1 = time.time()
    outs, how = generate(model, prompts, a.max_new_tokens, a.temperature, eos)
    print(f"\n== samples ({how}, temperature {a.temperature}, {time.time() - t1:.1f}s) ==")
    for p, o in zip(PROMPTS, outs):
        print(f"\n>>> {p}{tok.decode(o)}")
    print(f"\ndemo done in {time.time() - t0:.0f}s; val bits/byte {summary.get('val_bpb', float('nan')):.3f}; "
          f"checkpoint {folder}")
    print(f"\ntry it:\n  .venv/bin/dsv2 generate --model {folder} --prompt 'The class' --temperature 0.7 --top-k 40"
          f"\n  .venv/bin/dsv2 serve --model {folder}        # OpenAI API on http://127.0.0.1:8000/v1"
          f" (quick start: README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
