"""Issue 13 side by side: llama.cpp and dsv2 on the same checkpoint, the same machine and thread count, in one run.

The model is issue 13's shape (benchmarks/decode.py's lite_shape(2): V2-Lite attention, 2 dense layers,
vocab 102,400) saved once by dsv2 in the hub layout (`--checkpoint`) and converted from that same folder
to GGUF by llama.cpp's own convert_hf_to_gguf.py + llama-quantize (`--gguf-dir`; see GGUF_HELP or
BENCHMARKS.md for the commands). Format pairs:

    llama.cpp bf16  <->  dsv2 bf16 (from_pretrained)
    llama.cpp Q8_0  <->  dsv2 int8 (per output channel, quantised while loading)
    llama.cpp Q4_0  <->  dsv2 int4, groups of 32 (Q4_0's block; --no-g32 skips it) and of 128 (dsv2's default;
                         --no-g128 skips it)
    --int8-activations adds dsv2's int8 / int4 rows with activations rounded to int8 per 32 values
    ("... a8": EngineConfig.int8_activations, the rounding llama.cpp's Q8_0 / Q4_0 products use)

Workloads (the issue's):
- decode, batch 1, at 1K / 4K / 8K / 32K context. llama.cpp: `llama-bench -p 0 -n 32 -d S` (32 tokens
  after a prompt of S random tokens, the depth filled once per process and restored for each repetition),
  ms/token of the best repetition. dsv2: cpu.py's decode_step_fn (the cache filled with synthetic rows,
  one token decoded at position S) 32 times a call, ms/token of the best call, half the calls just before
  and half just after llama.cpp's;
- prefill of a 512 / 2,048-token prompt. llama.cpp: `llama-bench -p N -n 0` (best repetition); dsv2:
  Engine.generate of one new token (prefix cache off), best call, before and after llama.cpp's;
- 1 / 4 / 16 / 64 parallel sequences of 32 random prompt + 32 new tokens. llama.cpp: `llama-batched-bench
  -npp 32 -ntg 32 -npl N` (all prompts as one batch, then 32 steps of N tokens); dsv2: cpu.py's parallel_run
  (Engine.generate of the N prompts: prompt tok/s and decode tok/s from engine.stats, all tokens / wall);
  llama.cpp and dsv2 alternate, twice for N <= 16 (best of each), once for 64;
- peak RSS: llama.cpp's from /usr/bin/time of each of its processes (weights not mmapped: `-lm none`, so they are
  resident and counted), the prefill-512 process (n_ctx 512) and the 4-sequence batched-bench process
  (n_ctx 4096); dsv2: cpu.py's rss_per_format, one fresh process per format (a 512-token prompt and
  4 x (32+32) through an Engine with a 4,096-token cache).

Every row alternates llama.cpp and dsv2 measurements so that load from other jobs hits both alike; the
load average is printed at start and at end. Ratios are dsv2 speed / llama.cpp speed (> 1: dsv2 faster).

    python benchmarks/llamacpp.py --make-checkpoint --checkpoint DIR                     # the weights, once
    python benchmarks/llamacpp.py --llama-bin DIR --gguf-dir DIR --checkpoint DIR       # the issue's sizes
    python benchmarks/llamacpp.py --llama-bin DIR --gguf-dir DIR --checkpoint DIR --quick --threads 1
    python benchmarks/llamacpp.py ... --quantized-dir QDIR    # dsv2 int8/int4 from `dsv2 quantize`d folders
    python benchmarks/llamacpp.py ... --compile --no-rss      # dsv2's compiled decode step (20-35 s a bucket)

The full run is long on 2 cores: llama-bench fills the 32K depth with a 32,768-token prefill per format
(over 13 min for bf16 on one loaded core, ~8 min on 2 quiet ones); the rest takes ~10-25 min, --quick
~5-10. On a machine shared with other jobs use --threads 1: 2-thread steps of both programs slow down
several-fold when a neighbour holds a core. `--contexts` / `--prompts` / `--parallel` with no value skip that workload.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from _common import timed_rounds
from cpu import build, decode_step_fn, parallel_run, rss_per_format, weight_bytes
from decode import synthetic_rows
from dsv2.engine import Engine, SamplingParams

# llama.cpp GGUF type -> the dsv2 formats it is compared with (name -> (cpu.build format, int4 group size));
# a name ending in " a8" is the same weights with int8 activations
DSV2_FORMATS = {"bf16": ("bf16", 32), "int8": ("int8", 32), "int4 g32": ("int4", 32), "int4 g128": ("int4", 128)}
DSV2_FORMATS.update({f"{k} a8": v for k, v in DSV2_FORMATS.items() if k != "bf16"})
PAIRS = {"bf16": ["bf16"], "q8_0": ["int8"], "q4_0": ["int4 g32", "int4 g128"]}
LLAMA_NAME = {"bf16": "bf16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
TIME = "/usr/bin/time"  # GNU time: -f %M = peak RSS in KiB
DECODE_TOKENS = 32  # llama-bench -n: tokens per timed repetition; dsv2 times the same number of steps per call

GGUF_HELP = """\
{path} is missing. Make the GGUFs from the same checkpoint with llama.cpp's own tools
(llama.cpp source tree = SRC, a Python env with torch, transformers, numpy, sentencepiece, protobuf = PY):

  # the checkpoint (weights + a tokenizer.json the converter accepts; the benchmark feeds random ids):
  python benchmarks/llamacpp.py --make-checkpoint --checkpoint {ckpt}
  # convert it with two patches of the converter (BENCHMARKS.md, issue 13, "llama.cpp side by side", says why):
  cd SRC && PY -c "import runpy, sys, conversion.base as b; \\
      b.TextModel.get_vocab_base_pre = lambda self, tok: 'deepseek-llm'; \\
      import conversion.deepseek as d; f = d.DeepseekV2Model.set_gguf_parameters; \\
      d.DeepseekV2Model.set_gguf_parameters = lambda self: (f(self), \\
          self.hparams.get('q_lora_rank') or self.gguf_writer.add_q_lora_rank(0)); \\
      sys.argv = ['convert_hf_to_gguf.py', '{ckpt}', '--outtype', 'bf16', '--outfile', '{dir}/{name}-bf16.gguf']; \\
      runpy.run_path('convert_hf_to_gguf.py', run_name='__main__')"
  {bin}/llama-quantize --pure {dir}/{name}-bf16.gguf {dir}/{name}-q8_0.gguf Q8_0
  {bin}/llama-quantize --pure {dir}/{name}-bf16.gguf {dir}/{name}-q4_0.gguf Q4_0
"""


@dataclass
class LlamaRun:
    out: str
    err: str
    rss_gib: float
    wall_s: float
    cmd: list[str] = field(default_factory=list)


def make_checkpoint(path: str) -> None:
    """Issue 13's model (cpu.build's random bf16 weights, seed 0) in the hub layout, plus a minimal byte-level
    BPE tokenizer (256 byte tokens, 3 merges, BOS / EOS at the config's ids 100000 / 100001) that
    convert_hf_to_gguf.py accepts: the benchmark feeds random token ids, so its content does not matter;
    the converter pads the vocab to the config's 102,400 entries."""
    from dsv2.train.data import byte_level_chars

    model = build("bf16", 32)
    model.save_pretrained(path)
    cfg = model.config
    chars = sorted(byte_level_chars(), key=byte_level_chars().get)  # byte b -> its printable char, in byte order
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    vocab = {c: i for i, c in enumerate(chars)} | {a + b: 256 + i for i, (a, b) in enumerate(merges)}
    special = {"<｜begin▁of▁sentence｜>": cfg.bos_token_id, "<｜end▁of▁sentence｜>": cfg.eos_token_id}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for c, i in special.items()],
           "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": vocab | special, "merges": [f"{a} {b}" for a, b in merges]}}
    (Path(path) / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=1))
    names = list(special)
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[0], "eos_token": names[1],
         "add_bos_token": True, "add_eos_token": False, "model_max_length": cfg.max_position_embeddings},
        ensure_ascii=False, indent=1))
    print(f"wrote {path}: {cfg.num_parameters() / 1e6:.0f}M parameters (bf16) + tokenizer.json")


def quantized_folder(args: argparse.Namespace, f: str) -> str:
    """Where dsv2 format f loads from: --checkpoint, or with --quantized-dir (int8 / int4) a `dsv2 quantize`d
    copy of it, written first if missing (what a user would run: the embedding then stays memory-mapped)."""
    fmt, gs = DSV2_FORMATS[f]
    if args.quantized_dir is None or fmt == "bf16":
        return args.checkpoint
    from dsv2.quant.convert import quantize_folder

    folder = args.quantized_dir / f.removesuffix(" a8").replace(" ", "-")  # (a8: the same weights)
    if not (folder / "config.json").is_file():
        print(f"writing {folder} (dsv2 quantize {args.checkpoint} {folder} --weights {fmt}"
              + (f" --group-size {gs})" if fmt == "int4" else ")"),
              flush=True)
        quantize_folder(args.checkpoint, folder, fmt, gs if fmt == "int4" else None)
    return str(folder)


def run_llama(cmd: list[str]) -> LlamaRun:
    """Run one llama.cpp process under /usr/bin/time for its peak RSS. (wait4() from this process would not
    do: a child's high-water mark starts from the forked copy of this process, several GiB.)"""
    with tempfile.TemporaryDirectory() as d:
        rss_file = Path(d) / "rss"
        t0 = time.perf_counter()
        r = subprocess.run([TIME, "-f", "%M", "-o", str(rss_file), *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rss = rss_file.read_text().split() if rss_file.exists() else []
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return LlamaRun(r.stdout, r.stderr, int(rss[-1]) / 2**20 if rss else float("nan"), wall, cmd)


class Llama:
    """llama-bench / llama-batched-bench on one set of GGUFs, weights read into memory (-lm none: no mmap)."""

    def __init__(self, bin_dir: Path, gguf: dict[str, Path], threads: int, reps: int) -> None:
        self.bin, self.gguf, self.threads, self.reps = bin_dir, gguf, threads, reps
        self.info: dict[str, object] = {}
        self.rss: dict[tuple[str, str], float] = {}

    def bench(self, typ: str, key: str, *args: str, reps: int | None = None) -> dict:
        cmd = [str(self.bin / "llama-bench"), "-m", str(self.gguf[typ]), "-t", str(self.threads), "-lm", "none",
               "-r", str(reps or self.reps), "-o", "json", *args]
        r = run_llama(cmd)
        res = json.loads(r.out)
        assert len(res) == 1, res
        self.rss[(typ, key)] = r.rss_gib
        if not self.info:
            self.info = {k: res[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                                     "flash_attn", "type_k", "type_v", "n_batch", "n_ubatch")}
        return res[0]

    def decode_ms(self, typ: str, s: int) -> float:
        """ms per token of the best repetition of 32 tokens generated at depth s."""
        res = self.bench(typ, f"decode {s}", "-p", "0", "-n", str(DECODE_TOKENS), "-d", str(s))
        return 1e3 / max(res["samples_ts"])

    def prefill_tps(self, typ: str, n: int) -> float:
        res = self.bench(typ, f"prefill {n}", "-p", str(n), "-n", "0", reps=max(2, self.reps // 2))
        return max(res["samples_ts"])

    def batched(self, typ: str, n: int) -> tuple[float, float, float]:
        """(decode tok/s, prompt tok/s, all tokens / wall) of n sequences of 32 + 32 tokens."""
        cmd = [str(self.bin / "llama-batched-bench"), "-m", str(self.gguf[typ]), "-t", str(self.threads),
               "-tb", str(self.threads), "-lm", "none", "-c", str(max(64 * n, 4096)), "-b", "2048", "-ub", "512",
               "-npp", "32", "-ntg", "32", "-npl", str(n), "--output-format", "jsonl"]
        r = run_llama(cmd)
        lines = [json.loads(x) for x in (r.out + "\n" + r.err).splitlines() if x.startswith("{")]
        if not lines:
            raise RuntimeError(f"no jsonl result from {' '.join(cmd)}:\n{r.err[-3000:]}")
        d = lines[-1]
        self.rss[(typ, f"batched {n}")] = max(self.rss.get((typ, f"batched {n}"), 0.0), r.rss_gib)
        self.info.setdefault("batched_flash_attn", d.get("flash_attn"))
        return d["speed_tg"], d["speed_pp"], d["speed"]


def best_of(fn, calls: int) -> float:
    return timed_rounds({"x": (fn, calls)})["x"]


def fmt_ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, help="folder with llama-bench, llama-batched-bench")
    ap.add_argument("--gguf-dir", type=Path, help="folder with NAME-bf16/-q8_0/-q4_0.gguf")
    ap.add_argument("--gguf-name", default="model", help="GGUF file prefix (default: model)")
    ap.add_argument("--checkpoint", required=True, help="the hub-layout folder the GGUFs were converted from")
    ap.add_argument("--make-checkpoint", action="store_true",
                    help="instead: write issue 13's model (random, seed 0) + a tokenizer to --checkpoint and stop")
    ap.add_argument("--threads", type=int, default=2, help="threads for both sides (default 2)")
    ap.add_argument("--quick", action="store_true", help="1K / 4K decode, 512 prefill, 1 / 4 / 16 sequences")
    ap.add_argument("--types", nargs="+", default=list(PAIRS), choices=list(PAIRS), help="llama.cpp formats")
    ap.add_argument("--no-g128", action="store_true", help="skip dsv2 int4 with groups of 128")
    ap.add_argument("--no-g32", action="store_true", help="skip dsv2 int4 with groups of 32")
    ap.add_argument("--int8-activations", action="store_true",
                    help="also dsv2's int8/int4 with int8 activations (EngineConfig.int8_activations)")
    ap.add_argument("--contexts", type=int, nargs="*", default=None, help="decode contexts (none: skip decode)")
    ap.add_argument("--prompts", type=int, nargs="*", default=None, help="prefill lengths (none: skip prefill)")
    ap.add_argument("--parallel", type=int, nargs="*", default=None, help="sequence counts (none: skip)")
    ap.add_argument("--reps", type=int, default=None, help="llama-bench repetitions / dsv2 calls per row")
    ap.add_argument("--no-rss", action="store_true", help="skip dsv2's one-process-per-format memory rows")
    ap.add_argument("--compile", action="store_true",
                    help="dsv2 engines with compile=True (decode steps as one inductor graph per batch / context "
                         "bucket; each bucket compiles on first use, in an untimed warm-up call)")
    ap.add_argument("--quantized-dir", type=Path, default=None,
                    help="load dsv2's int8 / int4 formats from `dsv2 quantize`d folders here (int8, int4-g32, "
                         "int4-g128; written from --checkpoint when missing) instead of quantising while loading")
    args = ap.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args.checkpoint)
        return
    if args.llama_bin is None or args.gguf_dir is None:
        ap.error("--llama-bin and --gguf-dir are required (or --make-checkpoint)")

    contexts = args.contexts if args.contexts is not None else (
        [1024, 4096] if args.quick else [1024, 4096, 8192, 32768])
    prompts = args.prompts if args.prompts is not None else ([512] if args.quick else [512, 2048])
    parallel = args.parallel if args.parallel is not None else ([1, 4, 16] if args.quick else [1, 4, 16, 64])
    reps = args.reps or (3 if args.quick else 5)
    gguf = {t: args.gguf_dir / f"{args.gguf_name}-{t}.gguf" for t in args.types}
    for tool in ("llama-bench", "llama-batched-bench"):
        if not (args.llama_bin / tool).is_file():
            sys.exit(f"{args.llama_bin / tool} not found: build llama.cpp (BENCHMARKS.md, issue 13, "
                     "'llama.cpp side by side') and pass its bin folder as --llama-bin")
    for p in gguf.values():
        if not p.is_file():
            sys.exit(GGUF_HELP.format(path=p, ckpt=args.checkpoint, dir=args.gguf_dir, name=args.gguf_name,
                                      bin=args.llama_bin))
    skip = {"int4 g128"} if args.no_g128 else set()
    skip |= {"int4 g32"} if args.no_g32 else set()
    pairs = {t: [f for f in PAIRS[t] if f not in skip] for t in args.types}
    if args.int8_activations:
        pairs = {t: fs + [f"{f} a8" for f in fs if f != "bf16"] for t, fs in pairs.items()}

    load0 = os.getloadavg()
    t_start = datetime.datetime.now(datetime.UTC)
    print(f"start {t_start:%Y-%m-%d %H:%M} UTC; load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads} (llama.cpp -t/-tb, torch intra-op); torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    llama = Llama(args.llama_bin, gguf, args.threads, reps)

    # ---- dsv2: every format alive at once, one engine each
    fmts = [f for t in args.types for f in pairs[t]]
    max_tokens = max([4096, *(c + 64 for c in contexts), *(n + 64 for n in prompts),
                      *(n * 64 + 64 for n in parallel)]) + 64
    sources = {f: quantized_folder(args, f) for f in fmts}
    models, engines = {}, {}
    for f in fmts:
        fmt, gs = DSV2_FORMATS[f]
        models[f] = build(fmt, gs, sources[f])
        engines[f] = Engine(models[f], kv_cache_dtype="bf16", max_tokens=max_tokens, prefix_caching=False,
                            max_batch=max([64, *parallel]), compile=args.compile,
                            int8_activations=f.endswith(" a8"))  # (one model each: the switch is the model's)
        print(f"dsv2 {f}: weights {weight_bytes(models[f], False) / 2**20:.0f} MiB "
              f"({weight_bytes(models[f]) / 2**20:.0f} MiB read per decode step)", flush=True)
    for t, p in gguf.items():
        print(f"llama.cpp {LLAMA_NAME[t]}: {p} ({p.stat().st_size / 2**20:.0f} MiB)")
    cfg = models[fmts[0]].config

    rows: list[tuple[str, str, str, str, str, str]] = []  # workload, llama fmt, llama, dsv2 fmt, dsv2, ratio

    def emit(*r: str) -> None:
        rows.append(r)
        print(" | ".join(r), flush=True)

    print("\nworkload | llama.cpp fmt | llama.cpp | dsv2 fmt | dsv2 | dsv2 / llama.cpp speed")
    # ---- decode, batch 1
    for s in contexts:
        kv = synthetic_rows(cfg, s, torch.bfloat16, seed=s)
        for t in args.types:
            steps = {f: decode_step_fn(engines[f], kv) for f in pairs[t]}
            calls = {f: (lambda fn=fn: [fn() for _ in range(DECODE_TOKENS)]) for f, (fn, _) in steps.items()}
            if args.compile:  # compile this context's bucket outside the timed calls
                for fn, _ in steps.values():
                    fn()
            half = max(1, reps // 2)
            best = {f: best_of(fn, half) for f, fn in calls.items()}
            lc = llama.decode_ms(t, s)
            for f, fn in calls.items():
                best[f] = min(best[f], best_of(fn, reps - half))
            for _, free in steps.values():
                free()
            for i, f in enumerate(pairs[t]):
                ms = best[f] * 1e3 / DECODE_TOKENS
                emit(f"decode b=1, {s} ctx (ms/token)" if i == 0 else "", LLAMA_NAME[t] if i == 0 else "",
                     f"{lc:.1f}" if i == 0 else "", f, f"{ms:.1f}", fmt_ratio(lc, ms))
        del kv
        gc.collect()
    # ---- prefill
    for n in prompts:
        g = torch.Generator().manual_seed(n)
        prompt = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
        p1 = SamplingParams(max_new_tokens=1)
        calls = max(2, reps // 2)
        for t in args.types:
            fns = {f: (lambda e=engines[f], p=prompt, sp=p1: e.generate([p], sp)) for f in pairs[t]}
            best = {f: best_of(fn, max(1, calls // 2)) for f, fn in fns.items()}
            lc = llama.prefill_tps(t, n)
            for f, fn in fns.items():
                best[f] = min(best[f], best_of(fn, max(1, calls - calls // 2)))
            for i, f in enumerate(pairs[t]):
                tps = n / best[f]
                emit(f"prefill {n} tokens (tok/s)" if i == 0 else "", LLAMA_NAME[t] if i == 0 else "",
                     f"{lc:.0f}" if i == 0 else "", f, f"{tps:.0f}", fmt_ratio(tps, lc))
    # ---- parallel sequences of 32 + 32 tokens
    for n in parallel:
        g = torch.Generator().manual_seed(1000 + n)
        ps = [torch.randint(3, cfg.vocab_size, (32,), generator=g).tolist() for _ in range(n)]
        sp = SamplingParams(max_new_tokens=32)
        for t in args.types:
            res: dict[str, tuple[float, ...]] = {}
            lc = (0.0, 0.0, 0.0)
            if args.compile:  # compile the buckets of this batch size outside the timed runs
                for f in pairs[t]:
                    engines[f].generate(ps, sp)
            for _ in range(1 if n >= 64 else 2):
                lc = tuple(max(a, b) for a, b in zip(lc, llama.batched(t, n)))
                for f in pairs[t]:
                    parallel_run(engines[f], ps, sp, res, f)
            for i, f in enumerate(pairs[t]):
                ours = res[f]
                emit(f"{n} x (32+32): decode / prompt / all tok/s" if i == 0 else "",
                     LLAMA_NAME[t] if i == 0 else "", " / ".join(f"{x:.1f}" for x in lc) if i == 0 else "", f,
                     " / ".join(f"{x:.1f}" for x in ours), " / ".join(fmt_ratio(a, b) for a, b in zip(ours, lc)))
    load_mid = os.getloadavg()[0]
    # ---- memory
    engines.clear()
    models.clear()
    gc.collect()
    if not args.no_rss:
        ours = {}
        for t in args.types:
            for f in pairs[t]:
                fmt, gs = DSV2_FORMATS[f]
                if f.endswith(" a8"):  # the same weights; rounding adds a few KiB of scratch per product
                    ours[f] = ours[f.removesuffix(" a8")]
                    continue
                ours[f] = rss_per_format([fmt], gs, sources[f])[fmt]
        for t in args.types:
            p0 = min(prompts, default=512)
            lp = llama.rss.get((t, f"prefill {p0}"), float("nan"))
            lb = llama.rss.get((t, "batched 4"), float("nan"))
            big = max((x for x in (lp, lb) if x == x), default=float("nan"))
            for i, f in enumerate(pairs[t]):
                peak, _ = ours[f]
                emit(f"peak RSS, GiB (llama.cpp: prefill-{p0} / 4-seq process)" if i == 0 else "",
                     LLAMA_NAME[t] if i == 0 else "", f"{lp:.2f} / {lb:.2f}" if i == 0 else "", f, f"{peak:.2f}",
                     f"memory {peak / big:.2f}x")
    load1 = os.getloadavg()
    t_end = datetime.datetime.now(datetime.UTC)
    print(f"\nllama.cpp: build {llama.info.get('build_number')} ({llama.info.get('build_commit')}), "
          f"{llama.info.get('backends')}, cpu_info {llama.info.get('cpu_info')!r}; llama-bench flash_attn "
          f"{llama.info.get('flash_attn')}, KV {llama.info.get('type_k')}/{llama.info.get('type_v')}, "
          f"batch {llama.info.get('n_batch')}/{llama.info.get('n_ubatch')}; batched-bench flash_attn "
          f"{llama.info.get('batched_flash_attn')}")
    print("llama.cpp peak RSS of every process (GiB): "
          + ", ".join(f"{LLAMA_NAME[t]} {k} {v:.2f}" for (t, k), v in llama.rss.items()))
    print(f"\n{t_start:%Y-%m-%d %H:%M}-{t_end:%H:%M} UTC, {args.threads} threads, load average at start "
          f"{load0[0]:.2f}, after the timed rows {load_mid:.2f}, at end {load1[0]:.2f}\n")
    print("| workload | llama.cpp | llama.cpp | dsv2 | dsv2 | dsv2 / llama.cpp |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nratio: dsv2 speed / llama.cpp speed (> 1: dsv2 faster; decode: llama.cpp ms / dsv2 ms); "
          "memory row: dsv2 peak / the larger llama.cpp peak (< 1: dsv2 smaller)")


if __name__ == "__main__":
    main()
