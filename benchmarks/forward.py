"""Prefill throughput: dsv2 vs transformers' DeepseekV2ForCausalLM on the same random weights.

V2-Lite shapes (hidden 2048, 16 heads, d_c 512, d_R 64, vocab 102400), a few layers, one prompt.
Both models compute the same thing in one process; the ratio is what to read (absolute numbers
drift on shared machines). Two modes: full logits for every position (what a training forward
does) and next-token logits only (what a serving prefill needs; transformers' logits_to_keep=1).

    python benchmarks/forward.py                       # fp32, 2 dense layers, 2048 tokens
    python benchmarks/forward.py --dtype bf16 --tokens 2048 --layers 4 --moe

Timings interleave the two implementations call by call (best of --repeat), so load from other
processes hits both alike.
"""

from __future__ import annotations

import argparse

import torch

from _common import DTYPES, machine, timed_rounds, transformers_twin
from dsv2 import DeepseekV2, ModelConfig
from dsv2.precision import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--moe", action="store_true", help="first layer dense, the rest MoE (V2-Lite: 64 experts, top-6)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true", help="time dsv2 only")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--logits", choices=("last", "full", "both"), default="both",
                    help="next-token logits only, logits at every position, or both (default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    cfg = ModelConfig.from_preset("deepseek-v2-lite", num_hidden_layers=args.layers,
                                  first_k_dense_replace=1 if args.moe else args.layers)
    torch.manual_seed(0)
    model = prepare(DeepseekV2(cfg, dtype=dtype).eval())  # the CPU precision pass the engine applies too
    for moe in model.moe_layers():  # decisive routing, as trained routers have
        moe.gate.weight.data.mul_(50)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    print(f"machine: {machine()}")
    print(f"config: V2-Lite shapes, {args.layers} layers ({'MoE' if args.moe else 'dense'}), {args.dtype}, "
          f"{args.tokens} tokens, batch 1")
    hf = None if args.skip_hf else transformers_twin(model, dtype)
    modes = ("last", "full") if args.logits == "both" else (args.logits,)
    results: dict[tuple[str, str], float] = {}
    with torch.inference_mode():
        for mode in modes:
            def ours(mode: str = mode) -> None:
                h = model.forward_hidden(ids)
                model.lm_head(h[:, -1:] if mode == "last" else h)

            def theirs(mode: str = mode) -> None:
                hf(ids, logits_to_keep=1 if mode == "last" else 0)

            impls = {"dsv2": ours} if hf is None else {"dsv2": ours, "transformers": theirs}
            best = timed_rounds({name: (fn, args.repeat) for name, fn in impls.items()})
            results.update({(name, mode): t for name, t in best.items()})
    print(f"\n{'logits':<10}{'dsv2 tok/s':>12}{'transformers tok/s':>20}{'ratio':>8}")
    for mode in modes:
        ours_tps = args.tokens / results[("dsv2", mode)]
        line = f"{mode:<10}{ours_tps:>12,.0f}"
        if hf is not None:
            theirs_tps = args.tokens / results[("transformers", mode)]
            line += f"{theirs_tps:>20,.0f}{ours_tps / theirs_tps:>7.2f}x"
        print(line)


if __name__ == "__main__":
    main()
