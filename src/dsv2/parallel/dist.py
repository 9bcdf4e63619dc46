"""Process-group set-up from the torchrun environment, failure handling, rank-0 logging, launching.

torchrun (`python -m torch.distributed.run`) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_distributed()` reads them and picks the backend from the device (nccl for CUDA,
gloo for CPU). Without those variables everything degrades to a single process (world_size 1), so
the same trainer code runs with and without torchrun.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0  # a collective that waits longer than this means a peer died or hung


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died, hung or raised."""


@dataclass
class ParallelContext:
    """Where this process sits in the job. Filled by `init_distributed`; `setup` adds the mode."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (single process)
    timeout_s: float = DEFAULT_TIMEOUT_S
    mode: str = "none"  # "none" | "ddp" | "fsdp"
    expert_parallel: bool = False
    group: Any = None  # the process group (None = default group)
    ep_group: Any = None  # expert-parallel all-to-alls run on a communicator of their own

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    # ---- data --------------------------------------------------------------------------------
    def shard_batch(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (B_global, ...) -> (B_global / world_size, ...).

        Every rank draws the same global batch from the same seeded sampler and keeps its slice, so
        the global batch (and the loss curve) does not depend on the number of processes.
        """
        if self.world_size == 1:
            return rows
        n = rows.shape[0]
        if n % self.world_size:
            raise ValueError(f"global batch of {n} rows is not divisible by world_size={self.world_size}: "
                             "use a --batch-size that is a multiple of the number of processes")
        per = n // self.world_size
        return rows[self.rank * per:(self.rank + 1) * per]

    # ---- small collectives for logging ---------------------------------------------------------
    def mean(self, value: float | torch.Tensor) -> float:
        """Average a scalar over ranks (for logging; every rank must call it)."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self._comm_device()).detach().clone()
        if self.distributed:
            with self.guard("all_reduce(mean)"):
                dist.all_reduce(t, group=self.group)
            t /= self.world_size
        return float(t)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (e.g. expert-load counts for logging); every rank must call it."""
        if not self.distributed:
            return t
        out = t.detach().to(self._comm_device()).clone()
        with self.guard("all_reduce(sum)"):
            dist.all_reduce(out, group=self.group)
        return out.to(t.device)

    def barrier(self) -> None:
        if self.distributed:
            with self.guard("barrier"):
                dist.barrier(group=self.group)

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ---- logging -----------------------------------------------------------------------------
    def log(self, *args: Any, **kwargs: Any) -> None:
        """print() on rank 0 only (stderr by default)."""
        if self.is_main:
            kwargs.setdefault("file", sys.stderr)
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    # ---- failures ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, what: str = "training step") -> Iterator[None]:
        """Turn a failed/timed-out collective into a DistributedError that names this rank and the cause."""
        try:
            yield
        except DistributedError:
            raise
        except (RuntimeError, dist.DistError) as e:
            if not self.distributed or not _looks_like_comm_error(e):
                raise
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed: a collective did not complete "
                f"(another rank died, raised or hung longer than the {self.timeout_s:.0f}s timeout). "
                f"Cause: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
            ) from e

    def close(self) -> None:
        if self.backend is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.backend = None


def _looks_like_comm_error(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "closed",
                                   "broken pipe", "collective", "socket"))


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    def num(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None
    return num("RANK", 0), num("WORLD_SIZE", 1), num("LOCAL_RANK", 0)


def init_distributed(device: str | torch.device = "auto", timeout_s: float | None = None,
                     backend: str | None = None) -> ParallelContext:
    """Initialise the default process group from torchrun's environment (no-op for one process).

    device "auto": cuda:LOCAL_RANK when CUDA is available, else cpu. backend None: nccl for CUDA,
    gloo otherwise. timeout_s (default $DSV2_DIST_TIMEOUT or 300 s) bounds every collective, so a
    dead or hung rank turns into an error on every other rank instead of a hang.
    """
    rank, world, local = env_world()
    if timeout_s is None:
        timeout_s = float(os.environ.get("DSV2_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if str(device) == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    ctx = ParallelContext(rank=rank, world_size=world, local_rank=local, device=dev, timeout_s=timeout_s)
    if world == 1 and not dist.is_initialized():
        return ctx
    if not (0 <= rank < world):
        raise DistributedError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with "
                                   "torchrun (python -m torch.distributed.run --nproc_per_node N ...)")
        # NCCL: make a stuck collective abort the process instead of blocking forever
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        kw: dict[str, Any] = dict(backend=backend, rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=timeout_s))
        if dev.type == "cuda":
            kw["device_id"] = dev  # eager NCCL init: a bad GPU fails here, not at the first collective
        dist.init_process_group(**kw)
    ctx.backend = dist.get_backend()
    return ctx


@contextlib.contextmanager
def failfast(what: str = "training") -> Iterator[None]:
    """Wrap a whole distributed run: a failed or timed-out collective anywhere inside (DDP/FSDP hooks
    included) prints one clear line naming this rank and exits 1 at once, without a teardown that
    could itself block on the dead peer; torchrun then stops the remaining ranks. No-op without a
    process group; other exceptions propagate unchanged."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        if not isinstance(e, DistributedError):
            if not _looks_like_comm_error(e):
                raise
            timeout = float(os.environ.get("DSV2_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
            cause = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            e = DistributedError(
                f"rank {dist.get_rank()}/{dist.get_world_size()}: {what} failed: a collective did not "
                f"complete (another rank died, raised or hung longer than the {timeout:.0f}s timeout). "
                f"Cause: {type(e).__name__}: {cause}")
        print(f"dsv2 parallel: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)


def torchrun_command(nproc: int, argv: Sequence[str], module: str = "dsv2.train", nnodes: int = 1,
                     node_rank: int | None = None, master: str | None = None) -> list[str]:
    """The torchrun command line that runs `python -m module argv...` on nproc processes per node."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")  # a free local port, no rendezvous server needed
    else:
        if master is None or node_rank is None:
            raise ValueError("several nodes need master=HOST:PORT and node_rank")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--rdzv_endpoint={master}",
                "--rdzv_backend=c10d"]
    return cmd + ["--max_restarts=0", "-m", module, *argv]


def launch(nproc: int, argv: Sequence[str], module: str = "dsv2.train") -> None:
    """Replace this process by torchrun running `python -m module argv...` on nproc local processes.

    Never returns: torchrun's exit status becomes the command's (non-zero when any rank failed).
    """
    cmd = torchrun_command(nproc, list(argv), module)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def maybe_launch(argv: Sequence[str], module: str = "dsv2.train") -> list[str]:
    """The `--nproc N` hook of the train CLI: call it first with the command's arguments.

    `--nproc N` with N > 1 outside torchrun: exec torchrun with the other arguments (never returns).
    Otherwise: the arguments without `--nproc`, to parse as usual (inside torchrun, or N == 1).
    """
    nproc, rest = strip_nproc(argv)
    if nproc is not None and nproc > 1 and not under_torchrun():
        launch(nproc, rest, module)
    return rest


def strip_nproc(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """Split `--nproc N` / `--nproc=N` out of argv (for the CLI hook): (N or None, remaining args)."""
    out: list[str] = []
    nproc: int | None = None
    it = iter(range(len(argv)))
    args = list(argv)
    for i in it:
        a = args[i]
        if a == "--nproc":
            if i + 1 >= len(args):
                raise ValueError("--nproc needs a number of processes")
            nproc = _positive(args[i + 1])
            next(it, None)
        elif a.startswith("--nproc="):
            nproc = _positive(a.split("=", 1)[1])
        else:
            out.append(a)
    return nproc, out


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"--nproc expects a positive integer, got {text!r}") from None
    if n < 1:
        raise ValueError(f"--nproc expects a positive integer, got {n}")
    return n
