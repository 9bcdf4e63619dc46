"""`dsv2 ...` command line: parses arguments, then calls library functions."""

from __future__ import annotations

import argparse
import sys

from dsv2 import __version__


def _cmd_kv(args: argparse.Namespace) -> int:
    from dsv2.config import ModelConfig
    from dsv2.kv import report

    source = args.config or args.preset
    cfg = ModelConfig.load(source)
    compare = ModelConfig.load(args.compare) if args.compare else None
    name = args.preset if not args.config else str(args.config)
    if compare is None and name == "deepseek-v2":  # the paper's headline comparison
        compare, args.compare = ModelConfig.from_preset("deepseek-67b"), "deepseek-67b"
    print(report(cfg, name, dtype=args.dtype, context=args.context, gqa_groups=args.gqa_groups,
                 compare=compare, compare_name=args.compare or "", compare_dtype=args.compare_dtype))
    return 0


def _parse_tokens(text: str) -> int:
    """'4096', '32K', '128k' -> tokens."""
    t = text.strip().upper()
    mult = 1024 if t.endswith("K") else 1
    try:
        return int(float(t.removesuffix("K")) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (use e.g. 4096 or 32K)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 (MLA + DeepSeekMoE) in PyTorch.")
    p.add_argument("--version", action="version", version=f"dsv2 {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    kv = sub.add_parser("kv", help="per-token KV cache of MLA vs MHA/GQA/MQA (paper Table 1)",
                        description="Print the per-token KV cache of MLA beside MHA, GQA and MQA of the same "
                        "dims: elements and bytes per layer and per token, and per sequence at --context.")
    src = kv.add_mutually_exclusive_group()
    src.add_argument("--preset", default="deepseek-v2",
                     help="model preset (deepseek-v2, deepseek-v2-lite, deepseek-67b, tiny, small); "
                     "default deepseek-v2")
    src.add_argument("--config", help="a config.json file or checkpoint folder instead of a preset")
    kv.add_argument("--dtype", default="bf16",
                    help="cache element type: fp32, bf16, fp16, fp8, int8, int4, 6bit or bits per element "
                    "(default bf16)")
    kv.add_argument("--context", type=_parse_tokens, default=4096,
                    help="tokens per sequence for the per-sequence column, e.g. 4096 or 128K (default 4096)")
    kv.add_argument("--gqa-groups", type=int, default=None,
                    help="K/V groups of the GQA row (default n_heads/8, or the config's own)")
    kv.add_argument("--compare", default=None,
                    help="a reference model (preset or config.json) to compare against; "
                    "default deepseek-67b for the DeepSeek-V2 presets")
    kv.add_argument("--compare-dtype", default="bf16", help="cache dtype of the reference (default bf16)")
    kv.set_defaults(func=_cmd_kv)

    try:  # the engine and trainer own their flags; the CLI only dispatches
        from dsv2.engine.cli import add_generate_args, run_generate
    except ImportError:
        pass
    else:
        gen = sub.add_parser("generate", help="generate text from a checkpoint folder",
                             description="Generate with the paged latent-cache engine.")
        add_generate_args(gen)
        gen.set_defaults(func=run_generate)
    try:
        from dsv2.train.cli import add_train_args, run_train
    except ImportError:
        pass
    else:
        tr = sub.add_parser("train", help="train a DeepSeek-V2 model", description="Train a DeepSeek-V2 model.")
        add_train_args(tr)
        tr.set_defaults(func=run_train)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as e:  # user errors: one clear line, no traceback
        print(f"dsv2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
