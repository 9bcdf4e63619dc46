"""Atomic training checkpoints.

Layout of an output folder:

    OUT/step-000200/   config.json, model.safetensors (hub layout), tokenizer.json,
                       tokenizer_config.json, trainer_state.pt (optimizer, step, RNG, data position,
                       metric history), train_args.json
    OUT/latest         symlink to the newest complete step-* folder
    OUT/loss_curve.png, OUT/metrics.jsonl, OUT/summary.json

A checkpoint is written by `dsv2.atomic.atomic_folder` (a hidden temp folder, every file fsync'ed,
renamed into place; the model weights inside it are written in place, not in a second temp folder)
and only then is `latest` re-pointed (an atomic symlink replace). A crash at any moment leaves the
previous checkpoint and `latest` intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsv2.atomic import atomic_folder, fsync_dir
from dsv2.atomic import clean_stale_temps as clean_stale_temps  # one temp-folder policy for every writer

STATE_FILE = "trainer_state.pt"
ARGS_FILE = "train_args.json"
LATEST = "latest"


class ResumeError(ValueError):
    """A --resume folder that is missing, incomplete or from another configuration."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(out: Path, step: int, write_files: Callable[[Path], None], keep: int = 2) -> Path:
    """Write a checkpoint for `step` atomically; `write_files(folder)` fills the folder.

    Keeps the newest `keep` step folders (0 = keep all) and returns the final folder.
    """
    out = Path(out)
    final = out / step_dir_name(step)
    with atomic_folder(final) as tmp:  # re-saving a step (e.g. after a resume) replaces it the same way
        write_files(tmp)
    link_tmp = out / f".{LATEST}-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)
    os.replace(link_tmp, out / LATEST)
    fsync_dir(out)
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete step-* folders in `out`, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    dirs = [p for p in out.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists()]
    return sorted(dirs, key=lambda p: p.name)


def find_resume_dir(path: str | Path) -> Path:
    """A step folder, or an output folder (its `latest`, else its newest step-* folder)."""
    p = Path(path)
    if not p.exists():
        raise ResumeError(f"--resume: {p} does not exist")
    if (p / STATE_FILE).exists():
        return p
    if (p / LATEST).exists() and (p / LATEST / STATE_FILE).exists():
        return (p / LATEST).resolve()
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise ResumeError(f"--resume: {p} holds no checkpoint (no {STATE_FILE}, no step-* folder)")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / STATE_FILE)


def load_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"--resume: cannot read {Path(folder) / STATE_FILE}: {e}") from e


def config_diff(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between two flat dicts (e.g. two model configs)."""
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: checkpoint={b.get(k)!r} vs this run={a.get(k)!r}")
    return diffs
