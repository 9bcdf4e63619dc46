"""`dsv2.train` under torchrun: 2 processes (FSDP2 + expert parallel) train 4 steps with a checkpoint
at step 2; one process resumes from that checkpoint and steps 3-4 give the 2-process losses.

Two real trainer runs (~35 s on 2 cores). That 2 processes match 1 process step for step is checked
at lower cost in test_parallel.py.
Skipped if the trainer lacks the dsv2.parallel hooks; DSV2_TRAIN_MODULE selects another trainer
module (to try a patched copy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODULE = os.environ.get("DSV2_TRAIN_MODULE", "dsv2.train")


def _has_hooks() -> bool:
    import importlib

    try:
        trainer = importlib.import_module(f"{MODULE}.trainer")
    except ImportError:
        return False
    return hasattr(trainer.TrainArgs(), "expert_parallel")


pytestmark = pytest.mark.skipif(not _has_hooks(), reason="the trainer has no dsv2.parallel hooks yet")


def _corpus(tmp: Path) -> Path:
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box "
             "jovial kings and queens of many lands").split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(600)]
    path = tmp / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def _start(args: list[str], out: Path, extra: list[str] = ()) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "DSV2_DIST_TIMEOUT": "60"}
    proc = subprocess.Popen([sys.executable, "-m", MODULE, *args, "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _losses(job: tuple[subprocess.Popen, Path]) -> dict[int, float]:
    proc, out = job
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"trainer run {out} did not finish") from None
    assert proc.returncode == 0, log[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def test_two_process_checkpoint_resumes_in_one_with_same_losses(tmp_path):
    args = ["--preset", "tiny", "--data", str(_corpus(tmp_path)), "--vocab-size", "300", "--seq-len", "32",
            "--batch-size", "4", "--steps", "4", "--eval-every", "0", "--eval-batches", "1", "--no-progress",
            "--threads", "1", "--override", "n_group=2", "--override", "topk_group=1",
            "--capacity-factor", "1.0", "--comm-alpha", "0.02", "--device-alpha", "0.05"]
    two = _losses(_start(args, tmp_path / "two", ["--nproc", "2", "--parallel", "fsdp", "--expert-parallel",
                                                  "--save-every", "2", "--keep", "0"]))
    assert (tmp_path / "two" / "step-000002" / "model.safetensors").exists()
    one = _losses(_start(args, tmp_path / "one", ["--resume", str(tmp_path / "two" / "step-000002")]))
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert one[3] != one[2]  # really trained on
    assert [one[s] for s in (3, 4)] == pytest.approx([two[s] for s in (3, 4)], abs=1e-4)
