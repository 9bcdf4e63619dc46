"""`dsv2 ...` command line: parses arguments, then calls library functions."""

from __future__ import annotations

import argparse
import importlib
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
                    help="cache storage: fp32, bf16, fp16, or the engine's quantised formats fp8, int8, int4, "
                    "mixed (int4 c_kv + bf16 k_R), with an optional +rope_bf16 suffix (exact bits incl. scales); "
                    "or 6bit / a number of bits per element (default bf16)")
    kv.add_argument("--context", type=_parse_tokens, default=4096,
                    help="tokens per sequence for the per-sequence column, e.g. 4096 or 128K (default 4096)")
    kv.add_argument("--gqa-groups", type=int, default=None,
                    help="K/V groups of the GQA row (default n_heads/8, or the config's own)")
    kv.add_argument("--compare", default=None,
                    help="a reference model (preset or config.json) to compare against; "
                    "default deepseek-67b for the DeepSeek-V2 presets")
    kv.add_argument("--compare-dtype", default="bf16", help="cache dtype of the reference (default bf16)")
    kv.set_defaults(func=_cmd_kv)

    # the trainer and the engine own their flags: these entries are for `dsv2 --help`; main() hands over
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


# subcommands whose parser lives with the library code they drive: (module with main(argv), help)
DELEGATED: dict[str, tuple[str, str]] = {
    "generate": ("dsv2.engine.cli", "generate text from a checkpoint folder with the latent-cache engine"),
    "train": ("dsv2.train.cli", "train a DeepSeek-V2 model (balance losses, attention variants, resume)"),
    "serve": ("dsv2.serve.cli", "serve a checkpoint over the OpenAI HTTP API (needs the dsv2[serve] extra)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `dsv2 kv | head`: the reader went away, nothing to report
        return 0
    except (ValueError, FileNotFoundError, OSError) as e:  # user errors: one clear line, no traceback
        print(f"dsv2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
