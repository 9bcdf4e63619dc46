"""Start tests/parallel/worker.py on 2 local CPU processes, the way torchrun would (env variables)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(scenario: str, out: Path, world: int = 2, timeout_s: float = 30.0) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DSV2_DIST_TIMEOUT": str(timeout_s),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        log = open(out / f"log{rank}.txt", "w")  # noqa: SIM115 (the child owns it)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def run(scenario: str, out: Path, deadline_s: float = 150.0, **kw) -> list[int]:
    """Run to completion; kill everything and fail if the job outlives deadline_s."""
    procs = start(scenario, out, **kw)
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=deadline_s))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"{scenario}: the 2-process job hung for {deadline_s}s\n" + logs(out)) from None
    return codes


def logs(out: Path) -> str:
    return "\n".join(f"--- rank {f.name} ---\n{f.read_text()[-3000:]}" for f in sorted(out.glob("log*.txt")))
