"""A rank that dies (SIGKILL mid-training) makes every other rank exit with a clear error, no hang;
the last complete checkpoint stays loadable."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import launch  # noqa: E402

from dsv2 import DeepseekV2  # noqa: E402


def test_killed_rank_fails_the_job_fast(tmp_path):
    t0 = time.monotonic()
    procs = launch.start("die", tmp_path, timeout_s=20.0)
    try:
        codes = [p.wait(timeout=90) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        msg = "the surviving rank hung after its peer died\n"
        raise AssertionError(msg + launch.logs(tmp_path)) from None
    elapsed = time.monotonic() - t0
    assert codes[1] == -9  # the victim
    assert codes[0] == 1, launch.logs(tmp_path)
    log0 = (tmp_path / "log0.txt").read_text()
    assert "dsv2 parallel: error: rank 0/2" in log0 and "another rank died" in log0, log0[-2000:]
    assert elapsed < 90
    # the checkpoint written before the crash is complete and loads
    model = DeepseekV2.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert model.config.num_hidden_layers == 2
