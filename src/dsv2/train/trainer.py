"""The training loop: `prepare(args)` validates everything and builds data/tokenizer/config (no
training yet, so every bad input fails fast), `train(prep)` runs, checkpoints and summarises.

Shapes: B batch, T seq_len, V vocab, L_moe MoE layers, E routed experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ConfigError, ModelConfig
from dsv2.train import ckpt, data, metrics, optim

LOG_KEYS = ("loss", "aux_loss", "expert_loss", "device_loss", "comm_loss", "load_max_mean", "load_entropy",
            "dropped_frac", "grad_norm", "lr", "a2a_MB")


class TrainError(ValueError):
    """Bad training arguments; raised by `prepare` before any training starts."""


@dataclass
class TrainArgs:
    """Every knob of `dsv2 train` (the CLI flags map 1:1 onto these fields)."""

    preset: str = "small"
    data: list[str] | None = None
    text_key: str = "text"
    steps: int = 200
    out: str = "runs/train"
    attention: str | None = None
    kv_heads: int | None = None
    dense: bool = False
    override: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int | None = None
    schedule: str = "step"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16
    save_every: int = 0
    keep: int = 2
    seed: int = 0
    dtype: str = "fp32"
    device: str = "auto"
    capacity_factor: float | None = None
    drop_exempt_frac: float = 0.1
    aux_alpha: float | None = None
    device_alpha: float | None = None
    comm_alpha: float | None = None
    resume: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    val_frac: float = 0.05
    threads: int | None = None
    log_every: int = 10
    progress: bool = True
    peak_tflops: float | None = None
    stop_at: int | None = None
    parallel: str = "auto"  # none | ddp | fsdp | auto (ddp when several processes)
    expert_parallel: bool = False

    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.steps // 10)


@dataclass
class Prepared:
    args: TrainArgs
    cfg: ModelConfig
    tok: Any
    packed: data.PackedData
    out: Path
    device: torch.device
    resume_dir: Path | None
    bytes_per_token: torch.Tensor


# ---- validation + set-up (no training) ---------------------------------------------------------
def _check_args(a: TrainArgs) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise TrainError(msg)

    need(a.steps >= 1, f"--steps must be >= 1, got {a.steps}")
    need(a.batch_size >= 1, f"--batch-size must be >= 1, got {a.batch_size}")
    need(a.grad_accum >= 1, f"--grad-accum must be >= 1, got {a.grad_accum}")
    need(a.seq_len >= 2, f"--seq-len must be >= 2, got {a.seq_len}")
    need(a.lr > 0 and math.isfinite(a.lr), f"--lr must be a positive number, got {a.lr}")
    need(a.warmup is None or a.warmup >= 0, f"--warmup must be >= 0, got {a.warmup}")
    need(a.schedule in optim.SCHEDULES, f"--schedule must be one of {optim.SCHEDULES}, got {a.schedule!r}")
    need(a.eval_every >= 0 and a.save_every >= 0 and a.log_every >= 1,
         "--eval-every and --save-every must be >= 0 (0 = only at the end), --log-every >= 1")
    need(a.eval_batches >= 1, f"--eval-batches must be >= 1, got {a.eval_batches}")
    need(a.keep >= 0, f"--keep must be >= 0, got {a.keep}")
    need(a.dtype in ("fp32", "bf16"), f"--dtype must be fp32 or bf16, got {a.dtype!r}")
    need(a.capacity_factor is None or a.capacity_factor > 0,
         f"--capacity-factor must be > 0, got {a.capacity_factor}")
    need(0.0 <= a.drop_exempt_frac <= 1.0, f"--drop-exempt-frac must be in [0, 1], got {a.drop_exempt_frac}")
    need(a.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {a.grad_clip}")
    need(a.threads is None or a.threads >= 1, f"--threads must be >= 1, got {a.threads}")
    need(a.stop_at is None or 1 <= a.stop_at <= a.steps, f"--stop-at must be in 1..--steps, got {a.stop_at}")


def _check_out(out: Path) -> None:
    """Create --out and prove it is writable (os.access lies for root and on read-only mounts)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise TrainError(f"--out {out} is not a writable folder: {e.strerror or e}") from e


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise TrainError(f"--device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda requested but no CUDA device is available")
    return dev


def build_config(a: TrainArgs, vocab_size: int, bos: int | None, eos: int | None) -> ModelConfig:
    """The preset (or config.json) with the run's overrides applied."""
    try:
        cfg = ModelConfig.load(a.preset)
        ch: dict[str, Any] = {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos}
        if a.attention:
            ch["attention_type"] = a.attention
            if a.attention == "gqa" and a.kv_heads is None and cfg.num_key_value_heads in (
                    None, cfg.num_attention_heads):
                ch["num_key_value_heads"] = max(1, cfg.num_attention_heads // 2)  # a real grouping
        if a.kv_heads is not None:
            ch["num_key_value_heads"] = a.kv_heads
        if a.dense:
            ch.update(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None)
        for key, val in (("aux_loss_alpha", a.aux_alpha), ("device_aux_loss_alpha", a.device_alpha),
                         ("comm_aux_loss_alpha", a.comm_alpha)):
            if val is not None:
                ch[key] = val
        unknown = set(a.override) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise TrainError(f"--override: unknown ModelConfig field(s) {sorted(unknown)}")
        ch.update(a.override)
        cfg = cfg.replace(**ch)
    except ConfigError as e:
        raise TrainError(f"model config: {e}") from e
    if a.seq_len > cfg.max_position_embeddings:
        raise TrainError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    return cfg


def prepare(a: TrainArgs) -> Prepared:
    """Validate flags, data, tokenizer, config, output folder and resume folder. No training."""
    _check_args(a)
    device = _device(a.device)
    out = Path(a.out)
    _check_out(out)
    resume_dir = ckpt.find_resume_dir(out if a.resume == "auto" else a.resume) if a.resume else None
    docs = data.load_documents(a.data, a.text_key)
    if resume_dir is not None:
        tok = data.load_tokenizer(resume_dir)
    elif a.tokenizer:
        tok = data.load_tokenizer(a.tokenizer)
    else:
        tok = data.train_tokenizer(docs, a.vocab_size or ModelConfig.load(a.preset).vocab_size)
    n_tok = tok.get_vocab_size()
    if a.vocab_size is not None and a.vocab_size < n_tok:
        raise TrainError(f"--vocab-size {a.vocab_size} is smaller than the tokenizer's {n_tok} tokens")
    bos, eos = data.special_ids(tok)
    cfg = build_config(a, a.vocab_size or n_tok, bos, eos)
    packed = data.pack(data.encode_documents(tok, docs), a.seq_len, a.val_frac)
    if resume_dir is not None:
        _check_resume(resume_dir, a, cfg, packed)
    return Prepared(a, cfg, tok, packed, out, device, resume_dir, data.bytes_per_token(tok))


def _check_resume(folder: Path, a: TrainArgs, cfg: ModelConfig, packed: data.PackedData) -> None:
    try:
        old_cfg = ModelConfig.from_json(folder).to_dict()
    except (OSError, ConfigError) as e:
        raise ckpt.ResumeError(f"--resume: cannot read the model config in {folder}: {e}") from e
    diffs = ckpt.config_diff(cfg.to_dict(), old_cfg, ignore=("torch_dtype",))
    old = json.loads((folder / ckpt.ARGS_FILE).read_text())
    for key in ("seq_len", "batch_size", "grad_accum"):
        if old.get(key) != getattr(a, key):
            diffs.append(f"--{key.replace('_', '-')}: checkpoint={old.get(key)!r} vs this run={getattr(a, key)!r}")
    if old.get("data_fingerprint") != packed.fingerprint:
        diffs.append("training data: the tokenized corpus differs from the checkpoint's (--data/--val-frac)")
    if diffs:
        raise ckpt.ResumeError(f"--resume {folder} is from another configuration:\n  " + "\n  ".join(diffs))
    step = ckpt.load_state(folder)["step"]
    if step >= a.steps:
        raise ckpt.ResumeError(f"--resume {folder} is already at step {step} >= --steps {a.steps}; "
                               "pass a larger --steps to train further")


# ---- evaluation --------------------------------------------------------------------------------
def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, val: torch.Tensor, batch_size: int, max_batches: int | None, bpt: torch.Tensor,
             device: torch.device, dtype: str = "fp32") -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte. Never drops tokens (no capacity factor)."""
    was_training = model.training
    model.eval()
    nll, n_tok, n_bytes = 0.0, 0, 0
    try:
        for rows in data.val_batches(val, batch_size, max_batches):
            rows = rows.to(device)
            ids, tgt = rows[:, :-1], rows[:, 1:]  # (B,T)
            with _autocast(device, dtype):
                logits = model(ids)  # (B,T,V)
            nll += F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), reduction="sum").item()
            n_tok += tgt.numel()
            n_bytes += int(bpt.to(device)[tgt].sum())
    finally:
        model.train(was_training)
    return {"val_loss": nll / n_tok, "val_bpb": nll / (math.log(2) * max(n_bytes, 1))}


# ---- the loop ----------------------------------------------------------------------------------
def build_model(p: Prepared, device: torch.device) -> nn.Module:
    """The fp32 model to train (fresh, or the resume checkpoint's weights) in train mode, with the CPU
    precision policy applied (`dsv2.precision.prepare`: on CPUs without native bf16 GEMMs, bf16-autocast
    matmuls run in fp32, 30-50x faster there; a no-op elsewhere). Same parameters and state-dict keys, so
    it goes before the parallel wrappers."""
    from dsv2.model import DeepseekV2
    from dsv2.precision import prepare

    if p.resume_dir is not None:
        model = DeepseekV2.from_pretrained(p.resume_dir, dtype=torch.float32, device=device)
    else:
        model = DeepseekV2(p.cfg, device=device, dtype=torch.float32)
    return prepare(model.train(), autocast=torch.bfloat16 if p.args.dtype == "bf16" else None)


def _rng_state(drop_gen: torch.Generator) -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "drop": drop_gen.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict[str, Any], drop_gen: torch.Generator) -> None:
    torch.set_rng_state(s["torch"])
    drop_gen.set_state(s["drop"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def train(p: Prepared) -> dict[str, Any]:
    """Run the training loop; returns the final summary (also written to OUT/summary.json)."""
    from dsv2 import parallel  # imported late: data/flag errors must not wait for torch modules

    a, cfg = p.args, p.cfg
    pctx = parallel.init_distributed(p.device)
    dev = pctx.device
    main = pctx.is_main
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    drop_gen = torch.Generator().manual_seed(a.seed + 1)
    if main:
        ckpt.clean_stale_temps(p.out)
    model = build_model(p, dev)
    n_total, n_active = metrics.active_params(model, cfg)  # before sharding: the logical model
    fpt = metrics.flops_per_token(model, cfg, a.seq_len)
    mode = a.parallel if a.parallel != "auto" else ("ddp" if pctx.world_size > 1 else "none")
    model, pctx = parallel.setup(model, mode=mode, expert_parallel=a.expert_parallel, ctx=pctx)
    opt = optim.build_optimizer(model, a.lr, a.weight_decay)
    sampler = data.BatchSampler(p.packed.train.shape[0], a.batch_size * a.grad_accum, a.seed)
    history: list[dict[str, Any]] = []
    step, tokens_seen, train_time = 0, 0, 0.0
    if p.resume_dir is not None:
        state = ckpt.load_state(p.resume_dir)
        parallel.load_optimizer_state_dict(model, opt, state["optimizer"], pctx)
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"], drop_gen)
        history, step = state["history"], state["step"]
        tokens_seen, train_time = state["tokens_seen"], state["train_time"]
    metrics_path = p.out / "metrics.jsonl"
    if main:
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    log_f = open(metrics_path if main else os.devnull, "a", buffering=1)  # noqa: SIM115 (closed in finally)
    tokens_per_step = a.batch_size * a.grad_accum * a.seq_len
    warmup, last_saved = a.warmup_steps(), step
    final_eval: dict[str, float] = {}

    def save(at: int) -> Path | None:
        plain = parallel.export_model(model, pctx)  # collectives: every rank takes part
        opt_state = parallel.optimizer_state_dict(model, opt, pctx)
        if not main:
            pctx.barrier()
            return None

        def write(folder: Path) -> None:
            plain.save_pretrained(folder)
            data.save_tokenizer(p.tok, folder)
            ckpt.save_state(folder, {
                "step": at, "optimizer": opt_state, "sampler": sampler.state_dict(),
                "rng": _rng_state(drop_gen), "history": history, "tokens_seen": tokens_seen,
                "train_time": train_time})
            ckpt.write_json(folder / ckpt.ARGS_FILE, {**dataclasses.asdict(a),
                                                      "data_fingerprint": p.packed.fingerprint})
        folder = ckpt.save_checkpoint(p.out, at, write, keep=a.keep)
        pctx.barrier()
        return folder

    bar = _progress(a, step) if main else None
    par = f", {pctx.world_size} processes ({mode}{' + expert parallel' if a.expert_parallel else ''})" \
        if pctx.world_size > 1 else ""
    pctx.log(f"dsv2 train: {cfg.attention_type}{'' if cfg.is_moe else ' dense'} model, {n_total / 1e6:.2f}M "
             f"params ({n_active / 1e6:.2f}M active/token), {p.packed.train.shape[0]} train / "
             f"{p.packed.val.shape[0]} val sequences of {a.seq_len} tokens, {a.steps} steps on {dev}"
             f"{par}{f' (resuming at step {step})' if step else ''}")
    stop = a.stop_at or a.steps
    interrupted = False
    pending: list[StepStats] = []  # steps since the last log point; their statistics are still on the device

    def record(recs: list[dict[str, Any]]) -> None:
        history.extend(recs)
        pending.clear()
        for rec in recs:
            log_f.write(json.dumps(rec) + "\n")
        if main:
            _report(bar, recs, a)

    try:
        while step < stop:
            t0 = time.perf_counter()
            lr = optim.lr_at(step, lr=a.lr, total_steps=a.steps, warmup=warmup, schedule=a.schedule,
                             min_lr_ratio=a.min_lr_ratio)
            optim.set_lr(opt, lr)
            rows = p.packed.train[sampler.next_indices()]  # (B*accum, T+1)
            stats = _train_step(model, opt, rows, a, dev, drop_gen, pctx)
            step += 1
            evals = bool(a.eval_every and step % a.eval_every == 0) or step == a.steps
            saves = bool(a.save_every and step % a.save_every == 0) or step == a.steps
            # a log point: a console line, an evaluation, a checkpoint or the last step. Only here are the
            # statistics read from the device (one host synchronisation for all steps since the last one)
            logs = evals or saves or step % a.log_every == 0 or step == stop
            values = read_stats([*pending, stats], a, pctx) if logs else None
            dt = time.perf_counter() - t0
            tokens_seen += tokens_per_step
            train_time += dt
            stats.host.update(step=step, lr=lr, tok_s=tokens_per_step / dt)
            pending.append(stats)
            if bar is not None:
                bar.update(1)
            if values is not None:
                recs = [{**v, **st.host} for v, st in zip(values, pending)]
                if evals:
                    recs[-1].update(evaluate(model, p.packed.val, a.batch_size, a.eval_batches,
                                             p.bytes_per_token, dev, a.dtype))
                    final_eval = {k: recs[-1][k] for k in ("val_loss", "val_bpb")}
                record(recs)
            if saves:
                save(step)
                last_saved = step
        if step > last_saved:  # --stop-at: pause with a checkpoint to --resume from
            save(step)
    except KeyboardInterrupt:
        interrupted = True
        if pending:  # the finished steps not yet logged go into the checkpoint's history too
            record([{**v, **st.host} for v, st in zip(read_stats(pending, a, pctx), pending)])
        if step > last_saved:
            print(f"\ninterrupted: saving step {step} ...", file=sys.stderr)
            save(step)
    finally:
        log_f.close()
        if bar is not None:
            bar.close()
    if not main:
        return {"steps": step, "interrupted": interrupted or step < a.steps}
    metrics.plot_curves(history, p.out / "loss_curve.png",
                        f"dsv2 {cfg.attention_type}{' MoE' if cfg.is_moe else ''}, {n_total / 1e6:.1f}M params")
    tok_s = tokens_seen / max(train_time, 1e-9)
    peak = a.peak_tflops or metrics.peak_tflops(dev, torch.get_num_threads(), a.dtype)
    summary = {"steps": step, "tokens": tokens_seen, "train_loss": history[-1]["loss"] if history else None,
               **final_eval, "tok_s": tok_s, "mfu": fpt * tok_s / (peak * 1e12), "peak_tflops": peak,
               "params": n_total, "active_params": n_active, "train_time_s": train_time,
               "checkpoint": str(p.out / ckpt.LATEST), "loss_curve": str(p.out / "loss_curve.png"),
               "interrupted": interrupted or step < a.steps}
    ckpt.write_json(p.out / "summary.json", summary)
    _print_summary(summary)
    return summary


@dataclass
class StepStats:
    """One optimizer step's statistics, left where they were computed until a log point reads them."""

    keys: tuple[str, ...]  # names of the per-micro-batch scalars
    micro: torch.Tensor  # (grad_accum, len(keys)) float64, on the training device
    grad_norm: torch.Tensor | None  # 0-d, None without clipping
    load: torch.Tensor | None  # (L_moe, E) picks per expert summed over the micro-batches (this rank)
    extra: dict[str, Any]  # already on the host (expert-parallel traffic)
    host: dict[str, Any] = field(default_factory=dict)  # step, lr, tok_s: filled in by the loop


def _train_step(model, opt, rows: torch.Tensor, a: TrainArgs, dev: torch.device,
                drop_gen: torch.Generator, pctx) -> StepStats:
    """One optimizer step over grad_accum micro-batches of batch_size rows. Its statistics stay on the
    device (no host synchronisation here); `read_stats` turns them into numbers."""
    from dsv2 import parallel

    is_moe = model.config.is_moe
    keys = ("loss", "aux_loss", "expert_loss", "device_loss", "comm_loss", "dropped_frac") if is_moe else ("loss",)
    per_micro, loads = [], []
    micros = rows.split(a.batch_size)
    for i, micro in enumerate(micros):
        # the same global micro-batch (and exempt draw) for any number of processes; each keeps its slice
        exempt = torch.rand(micro.shape[0], generator=drop_gen) < a.drop_exempt_frac  # (B,)
        micro, exempt = pctx.shard_batch(micro).to(dev), pctx.shard_batch(exempt).to(dev)
        ids, tgt = micro[:, :-1], micro[:, 1:]  # (B,T)
        no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce only on the last micro-batch
        sync = no_sync() if no_sync is not None and i < len(micros) - 1 else contextlib.nullcontext()
        with sync:
            with _autocast(dev, a.dtype):
                logits, aux = model(ids, return_aux=True, capacity_factor=a.capacity_factor,
                                    drop_exempt=exempt)
            aux = parallel.adjust_aux(model, aux)  # expert parallel: device/comm losses over real ranks
            ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
            loss = ce + aux["aux_loss"] if is_moe else ce
            (loss / a.grad_accum).backward()
        per_micro.append(torch.stack([ce.detach().double(), *(aux[k].detach().double() for k in keys[1:])]))
        if is_moe:
            loads.append(aux["expert_load"].detach())
    norm = parallel.clip_grad_norm_(model, a.grad_clip, pctx) if a.grad_clip > 0 else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    extra: dict[str, Any] = {}
    ep = parallel.gather_stats(model, pctx)  # expert parallel: per-rank load and all-to-all volume
    if ep is not None:
        extra["a2a_MB"] = float(ep["a2a_bytes"].sum()) / 1e6
        extra["rank_load"] = ep["rank_load"].tolist()
    return StepStats(keys, torch.stack(per_micro), norm, torch.stack(loads).sum(0) if loads else None, extra)


def read_stats(steps: list[StepStats], a: TrainArgs, pctx) -> list[dict[str, Any]]:
    """The logged numbers of these steps: one device-to-host copy and, with several processes, one
    all-reduce (every rank calls it at the same steps). Micro-batch values are averaged in the same
    order and float arithmetic as they would be if read every step."""
    micro = torch.stack([st.micro for st in steps]).tolist()  # (S, grad_accum, K)
    norms = [None] * len(steps) if steps[0].grad_norm is None else \
        torch.stack([st.grad_norm.double() for st in steps]).tolist()
    recs: list[dict[str, Any]] = []
    for st, rows, norm in zip(steps, micro, norms):
        acc: dict[str, Any] = {}
        for row in rows:
            for k, v in zip(st.keys, row):
                acc[k] = acc.get(k, 0.0) + v / a.grad_accum
        if norm is not None:
            acc["grad_norm"] = norm
        recs.append(acc)
    if pctx.world_size > 1:  # the mean over ranks (the gradient norm is global already)
        keys = sorted(k for k in recs[0] if k != "grad_norm")
        vals = pctx.sum(torch.tensor([[r[k] for k in keys] for r in recs], dtype=torch.float64)) / pctx.world_size
        for r, v in zip(recs, vals.tolist()):
            r.update(zip(keys, v))
    if steps[0].load is not None:
        loads = pctx.sum(torch.stack([st.load for st in steps])).cpu()  # (S, L_moe, E) over all ranks
        for r, load in zip(recs, loads):
            r.update(metrics.load_stats(load))
    for r, st in zip(recs, steps):
        r.update(st.extra)
    return recs


def _progress(a: TrainArgs, start: int):
    if not a.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=a.stop_at or a.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr)


def _report(bar, recs: list[dict[str, Any]], a: TrainArgs) -> None:
    """Progress-bar figures (the latest loss, tokens/s over these steps) and the due log lines."""
    if bar is not None:
        tok_s = len(recs) / sum(1.0 / r["tok_s"] for r in recs)
        bar.set_postfix(loss=f"{recs[-1]['loss']:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
    for rec in recs:
        step = rec["step"]
        if step % a.log_every == 0 or "val_loss" in rec or step == a.steps:
            parts = [f"step {step:>6}"] + [f"{k} {rec[k]:.4g}" for k in LOG_KEYS if k in rec]
            if "val_loss" in rec:
                parts.append(f"val_loss {rec['val_loss']:.4f} val_bpb {rec['val_bpb']:.4f}")
            line = " | ".join(parts)
            if bar is not None:
                bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr)


def _print_summary(s: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [("steps", s["steps"]), ("tokens", s["tokens"]), ("train loss", s["train_loss"]),
            ("val loss", s.get("val_loss", "n/a")), ("val bits/byte", s.get("val_bpb", "n/a")),
            ("tokens/s", f"{s['tok_s']:.0f}"),
            ("MFU (est.)", f"{100 * s['mfu']:.1f}% of {s['peak_tflops']:.2f} TFLOP/s"),
            ("params", f"{s['params'] / 1e6:.2f}M total, {s['active_params'] / 1e6:.2f}M active"),
            ("checkpoint", s["checkpoint"]), ("loss curve", s["loss_curve"])]
    print("\n== training summary ==")
    for k, v in rows:
        print(f"  {k:<14} {fmt(v)}")
    if s["interrupted"]:
        print(f"  (stopped early: resume with --resume {os.path.dirname(s['checkpoint'])})")
