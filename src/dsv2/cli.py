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


def _cmd_init(args: argparse.Namespace) -> int:
    from dsv2.checkpoint import write_random_checkpoint
    from dsv2.config import ModelConfig
    from dsv2.units import parse_dtype

    cfg = ModelConfig.load(args.preset)
    n = write_random_checkpoint(cfg, args.out, dtype=parse_dtype(args.dtype, "--dtype"), seed=args.seed,
                                max_shard_size=args.max_shard_size)
    print(f"dsv2 init: {args.preset}: {cfg.num_parameters() / 1e9:.2f}B parameters, {n / 2**30:.2f} GiB "
          f"of {args.dtype} weights written to {args.out}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from dsv2.quant.convert import quantize_folder

    out = quantize_folder(args.model, args.out, args.weights, args.group_size, max_shard_size=args.max_shard_size)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"dsv2 quantize: {args.model} -> {out} ({args.weights}"
          f"{f', group {args.group_size or 128}' if args.weights == 'int4' else ''}, {size / 2**30:.2f} GiB)")
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

    init = sub.add_parser("init", help="write a random checkpoint of a preset's real shape (streamed, low memory)",
                          description="Write config.json + sharded safetensors in the hub layout with random "
                          "weights (std = initializer_range), tensor by tensor: the model is never held in memory "
                          "(V2-Lite: 31 GB written in under 2 GiB of RAM).")
    init.add_argument("--preset", required=True, help="preset name or config.json (e.g. deepseek-v2-lite, small)")
    init.add_argument("--out", required=True, help="output folder (replaced atomically)")
    init.add_argument("--dtype", default="bf16", help="fp32, bf16 or fp16 (default bf16)")
    init.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    init.add_argument("--max-shard-size", default="4GB", help="shard size limit (default 4GB)")
    init.set_defaults(func=_cmd_init)

    qz = sub.add_parser("quantize", help="write an int8/int4 copy of a checkpoint folder (streamed)",
                        description="Quantise every Linear (but the router and kv_b_proj) and the MoE experts of a "
                        "hub-layout folder to int8 (per channel) or int4 (per group), reading one tensor at a time, "
                        "and write a folder whose config.json has a quantization_config; "
                        "DeepseekV2.from_pretrained and `dsv2 generate` load it memory-mapped.")
    qz.add_argument("--model", required=True, help="source checkpoint folder (bf16/fp32 safetensors)")
    qz.add_argument("--out", required=True, help="output folder (replaced atomically)")
    qz.add_argument("--weights", required=True, choices=("int8", "int4"), help="weight format")
    qz.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64, 128 or 256 (default 128)")
    qz.add_argument("--max-shard-size", default="4GB", help="shard size limit (default 4GB)")
    qz.set_defaults(func=_cmd_quantize)

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
