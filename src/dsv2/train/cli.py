"""`dsv2 train` / `python -m dsv2.train`: parse flags, validate, train. `main(argv) -> exit code`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from dsv2.train.trainer import TrainArgs

EPILOG = """\
examples:
  python -m dsv2.train --preset small --steps 300 --out runs/small      # default corpus, no download
  python -m dsv2.train --preset tiny --data notes.txt more.jsonl --steps 100 --out runs/tiny
  python -m dsv2.train --preset small --attention gqa --kv-heads 2 --dense --out runs/gqa
  python -m dsv2.train --preset small --steps 300 --out runs/small --resume   # continue runs/small

output folder: step-NNNNNN/ checkpoints (hub layout + tokenizer.json; load with
DeepseekV2.from_pretrained, transformers' AutoModelForCausalLM or `dsv2 generate`), `latest` ->
newest checkpoint, metrics.jsonl (one record per step), loss_curve.png, summary.json.
"""


def _override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    key, val = text.split("=", 1)
    try:
        return key.strip(), json.loads(val)
    except json.JSONDecodeError:
        return key.strip(), val  # a bare string, e.g. topk_method=greedy


def build_parser(prog: str = "dsv2 train") -> argparse.ArgumentParser:
    d = TrainArgs()
    p = argparse.ArgumentParser(prog=prog, description="Train a DeepSeek-V2 (MLA + DeepSeekMoE) language "
                                "model from scratch on text files.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=d.preset, metavar="NAME|PATH",
                   help="model preset (tiny, small, deepseek-v2-lite, deepseek-v2, deepseek-67b) or a "
                        "config.json / checkpoint folder (default: %(default)s)")
    g.add_argument("--attention", choices=["mla", "mha", "gqa", "mqa"], default=None,
                   help="attention type; mha/gqa/mqa are the baselines of the same model dims "
                        "(default: the preset's, mla)")
    g.add_argument("--kv-heads", type=int, default=None, metavar="N",
                   help="K/V heads for --attention gqa (default: half the query heads)")
    g.add_argument("--dense", action="store_true", help="no MoE: every layer uses the dense SwiGLU MLP")
    g.add_argument("--override", type=_override, action="append", default=[], metavar="FIELD=VALUE",
                   help="set any ModelConfig field (JSON value), e.g. --override hidden_size=256; repeatable")
    g.add_argument("--capacity-factor", type=float, default=d.capacity_factor, metavar="F",
                   help="MoE device-level token dropping: each device (expert group) takes at most "
                        "F x its even share of picks; the lowest-affinity picks beyond it are dropped. "
                        "Training only, never at evaluation (default: no dropping; the paper uses 1.0)")
    g.add_argument("--drop-exempt-frac", type=float, default=d.drop_exempt_frac, metavar="P",
                   help="fraction of sequences never dropped (default: %(default)s)")
    g.add_argument("--aux-alpha", type=float, default=None, metavar="A1",
                   help="expert-level balance loss weight alpha1 (default: the preset's aux_loss_alpha)")
    g.add_argument("--device-alpha", type=float, default=None, metavar="A2",
                   help="device-level balance loss weight alpha2 over n_group groups (default: preset's)")
    g.add_argument("--comm-alpha", type=float, default=None, metavar="A3",
                   help="communication balance loss weight alpha3 (M = topk_group) (default: preset's)")

    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text files (one document each) or .jsonl files (one document per line); "
                        "default: CPython's bundled documentation (pydoc_data.topics), no download")
    g.add_argument("--text-key", default=d.text_key, help="JSONL field holding the text (default: %(default)s)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="use this tokenizer.json (or a folder holding one) instead of training a "
                        "byte-level BPE on the data")
    g.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="BPE vocabulary to train and model vocab_size (default: the preset's vocab_size)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, metavar="T",
                   help="tokens per packed training sequence (default: %(default)s)")
    g.add_argument("--val-frac", type=float, default=d.val_frac, metavar="F",
                   help="fraction of sequences held out for validation, at least one (default: %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, metavar="N",
                   help="optimizer steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, metavar="B",
                   help="sequences per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="N",
                   help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="linear warm-up steps (default: min(100, steps/10))")
    g.add_argument("--schedule", choices=["step", "cosine", "constant"], default=d.schedule,
                   help="after warm-up: 'step' = DeepSeek-V2's x0.316 at 60%% and 90%% of steps; "
                        "'cosine' = cosine to --min-lr-ratio x lr (default: %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, metavar="R",
                   help="final LR / peak LR for --schedule cosine (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="WD",
                   help="AdamW weight decay on matrices only, betas (0.9, 0.95) (default: %(default)s)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, metavar="NORM",
                   help="clip the global gradient norm, 0 = off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for init, data order, dropping (default: 0)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default=d.dtype,
                   help="compute precision: bf16 = bf16 autocast over fp32 weights (default: %(default)s)")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=d.out, metavar="DIR",
                   help="output folder for checkpoints, metrics and plots (default: %(default)s)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="DIR",
                   help="continue from a checkpoint: a step-* folder or an output folder (its latest); "
                        "bare --resume uses --out. Model config, --seq-len, --batch-size, --grad-accum "
                        "and data must match")
    g.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                   help="validation every N steps and at the end; 0 = only at the end (default: %(default)s)")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches, metavar="N",
                   help="validation batches per evaluation (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                   help="checkpoint every N steps; always at the end (default: only at the end)")
    g.add_argument("--keep", type=int, default=d.keep, metavar="N",
                   help="newest checkpoints to keep, 0 = all (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="N",
                   help="print a full log line every N steps; step statistics are read from the device only "
                        "then (and at evaluations, checkpoints, the end), every step still goes to metrics.jsonl "
                        "(default: %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--peak-tflops", type=float, default=None, metavar="TF",
                   help="hardware peak for the MFU estimate (default: a rough guess for the device)")
    g = p.add_argument_group("distributed (see docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N local processes: re-launches itself under torchrun "
                        "(python -m torch.distributed.run --nproc_per_node N -m dsv2.train ...)")
    g.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"], default=d.parallel,
                   help="data parallelism under torchrun: ddp (replicated weights) or fsdp (FSDP2, sharded "
                        "weights/grads/optimizer state); auto = ddp when several processes (default: %(default)s)")
    g.add_argument("--expert-parallel", action="store_true",
                   help="shard the routed experts over the processes (E / world_size each) with all-to-all "
                        "token dispatch; needs n_group to be a multiple of the number of processes")
    g = p.add_argument_group("output (cont.)")
    g.add_argument("--stop-at", type=int, default=None, metavar="N",
                   help="stop (with a checkpoint) after step N of --steps, keeping the --steps schedule; "
                        "continue later with --resume")
    return p


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    kw = vars(ns).copy()
    kw["override"] = dict(kw.get("override") or [])
    kw.pop("nproc", None)
    return TrainArgs(**kw)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dsv2 train`. Returns 0 on success, 2 on bad input (before training), 130 on ^C;
    with several processes, a failed or timed-out collective exits 1 at once (`parallel.failfast`)."""
    from dsv2.parallel import failfast, maybe_launch
    from dsv2.train.ckpt import ResumeError
    from dsv2.train.data import DataError
    from dsv2.train.trainer import TrainError, prepare, train

    argv = maybe_launch(sys.argv[1:] if argv is None else argv, module="dsv2.train")  # --nproc N -> torchrun
    ns = build_parser().parse_args(argv)
    try:
        prep = prepare(args_from_namespace(ns))
    except (TrainError, DataError, ResumeError) as e:
        print(f"dsv2 train: error: {e}", file=sys.stderr)
        return 2
    with failfast():  # a dead/hung peer: one clear line and exit 1 on every rank (no-op in one process)
        summary = train(prep)
    return 130 if summary["interrupted"] and summary["steps"] < (ns.stop_at or ns.steps) else 0


if __name__ == "__main__":
    sys.exit(main())
