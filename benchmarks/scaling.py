"""Training throughput on 1 vs N processes and the all-to-all volume of expert parallelism.

    python benchmarks/scaling.py                      # small preset, 1 vs 2 processes (CPU, gloo)
    python benchmarks/scaling.py --preset tiny --steps 4 --nproc 2

Each configuration runs as its own job (processes started like torchrun does: RANK, WORLD_SIZE,
MASTER_ADDR/PORT), on the same global batch of random tokens, AdamW, fp32 (or --dtype bf16 autocast).
Prints tokens/s per configuration and the ratio to the 1-process run measured in the same
invocation, then the per-step communication volume: the all-to-all bytes expert parallelism
actually moved (measured) beside what a single device moves (nothing) and what per-pick dispatch
without device-limited routing would move (N·K·D, computed), plus the analytic DDP/FSDP volumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from dsv2 import DeepseekV2, ModelConfig, parallel
    from dsv2.precision import prepare
    from dsv2.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    ctx = parallel.init_distributed("cpu")
    overrides = json.loads(args.override)
    cfg = ModelConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(0)
    model = prepare(DeepseekV2(cfg, dtype=torch.float32))  # the CPU precision pass, as `dsv2 train`
    model, ctx = parallel.setup(model, mode=args.mode, expert_parallel=args.ep, ctx=ctx)
    opt = build_optimizer(model, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
               for _ in range(args.steps + args.warmup)]
    times, a2a, a2a_off, pick_bytes = [], [], [], []
    for i, rows in enumerate(batches):
        rows = ctx.shard_batch(rows)
        ctx.barrier()
        t0 = time.perf_counter()
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
        with amp:
            logits, aux = model(rows[:, :-1], return_aux=True, capacity_factor=args.capacity_factor)
        aux = parallel.adjust_aux(model, aux)
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten()) + aux["aux_loss"]
        loss.backward()
        parallel.clip_grad_norm_(model, 1.0, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.barrier()
        dt = time.perf_counter() - t0
        stats = parallel.gather_stats(model, ctx)
        if i >= args.warmup:
            times.append(dt)
            if stats is not None:
                a2a.append(float(stats["a2a_bytes"].sum()))
                a2a_off.append(float(stats["a2a_bytes_off_rank"].sum()))
        if ctx.is_main and args.ep and i == 0:
            # what per-pick dispatch (one row per (token, expert), no dedup) moves: N·K rows each way
            n_moe = len(parallel.unwrap(model).moe_layers())
            elem = 2 if args.dtype == "bf16" else 4
            pick_bytes.append(2 * args.batch * args.seq * cfg.num_experts_per_tok * cfg.hidden_size * elem * n_moe)
    if ctx.is_main:
        n_params = sum(p.numel() for p in DeepseekV2(cfg, device="meta").parameters())
        med = sorted(times)[len(times) // 2]  # median: robust to a busy neighbour on a shared machine
        res = {"tok_s": args.batch * args.seq / med, "step_s": med,
               "a2a_bytes": sum(a2a) / len(a2a) if a2a else 0.0,
               "a2a_bytes_off_rank": sum(a2a_off) / len(a2a_off) if a2a_off else 0.0,
               "per_pick_bytes": pick_bytes[0] if pick_bytes else 0.0, "params": n_params}
        Path(args.result).write_text(json.dumps(res))
    ctx.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(nproc: int, mode: str, ep: bool, a: argparse.Namespace, threads: int) -> dict:
    result = Path(f"/tmp/dsv2-scaling-{os.getpid()}-{nproc}-{mode}-{int(ep)}-{threads}.json")
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--result", str(result), "--preset", a.preset,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq", str(a.seq),
           "--threads", str(threads), "--dtype", a.dtype, "--override", a.override]
    if ep:
        cmd.append("--ep")
    if a.capacity_factor is not None:
        cmd += ["--capacity-factor", str(a.capacity_factor)]
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
        if nproc == 1:
            for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(k)
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"job nproc={nproc} mode={mode} ep={ep} failed: exit codes {codes}")
    res = json.loads(result.read_text())
    result.unlink()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--override", default="{}", help='JSON ModelConfig overrides, e.g. \'{"n_group": 2}\'')
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / nproc)")
    p.add_argument("--rounds", type=int, default=2,
                   help="run every configuration this many times, interleaved; report the best round")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    p.add_argument("--ep", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    cores = os.cpu_count() or 1
    n = a.nproc
    per = a.threads or max(1, cores // n)
    jobs = [(1, "none", False, a.threads or cores), (1, "none", False, per), (n, "ddp", False, per),
            (n, "fsdp", False, per), (n, "ddp", True, per)]
    print(f"dsv2 scaling: preset {a.preset} {a.override}, global batch {a.batch}x{a.seq} tokens, {a.dtype}, "
          f"{a.steps} timed steps, {cores} CPU cores, gloo", flush=True)
    best: dict[int, dict] = {}
    for r in range(a.rounds):
        for j, (nproc, mode, ep, threads) in enumerate(jobs):
            res = run_job(nproc, mode, ep, a, threads)
            if j not in best or res["tok_s"] > best[j]["tok_s"]:
                best[j] = res
            print(f"  round {r + 1}: {nproc} proc x {threads} threads {mode}{' +EP' if ep else ''}: "
                  f"{res['tok_s']:.0f} tok/s", flush=True)
    rows = [(nproc, mode, ep, threads, best[j]) for j, (nproc, mode, ep, threads) in enumerate(jobs)]
    base = rows[0][4]["tok_s"]  # 1 process using every core
    print(f"\n{'processes':>9} {'mode':<9} {'threads/proc':>12} {'tok/s':>9} {'vs 1 proc':>9} {'s/step':>7}")
    for nproc, mode, ep, threads, res in rows:
        name = mode + ("+EP" if ep else "")
        print(f"{nproc:>9} {name:<9} {threads:>12} {res['tok_s']:>9.0f} {res['tok_s'] / base:>8.2f}x "
              f"{res['step_s']:>7.2f}")
    ep_res = rows[-1][4]
    params = ep_res["params"]
    print(f"\ncommunication per training step ({n} processes, model {params / 1e6:.1f}M params, fp32 grads):")
    print("  single process                       : 0 B (no exchange)")
    print(f"  EP all-to-all, measured (fwd, all ranks): {ep_res['a2a_bytes'] / 1e6:8.2f} MB "
          f"({ep_res['a2a_bytes_off_rank'] / 1e6:.2f} MB left its rank); x2 with backward")
    print(f"  per-pick dispatch (N*K rows, computed)  : {ep_res['per_pick_bytes'] / 1e6:8.2f} MB "
          f"(ratio measured/per-pick {ep_res['a2a_bytes'] / max(ep_res['per_pick_bytes'], 1):.2f})")
    ring = 2 * (n - 1) / n * params * 4
    print(f"  DDP ring all-reduce of grads (computed) : {ring / 1e6:8.2f} MB per rank")
    print(f"  FSDP all-gather x2 + reduce-scatter     : {3 * (n - 1) / n * params * 4 / 1e6:8.2f} MB per rank")


if __name__ == "__main__":
    main()
