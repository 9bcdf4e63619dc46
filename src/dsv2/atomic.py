"""The one atomic folder writer: fill a hidden temp folder, fsync it, rename it over the destination.

Model checkpoints (`checkpoint.save_pretrained`, `dsv2 quantize`, `dsv2 init`) and training
checkpoints (`train.ckpt.save_checkpoint`) all write through `atomic_folder`, so they share one
naming scheme for temp folders (`.tmp-*` beside the destination, `.old-*` while swapping) that
`clean_stale_temps` removes after a crash, and one permission policy (the process umask, as for
any other output). A writer asked to write into a folder that is itself an atomic temp folder
(e.g. the trainer's step folder) writes in place: the outer writer already makes it atomic.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def is_temp(path: Path) -> bool:
    """Whether `path` is (directly inside) a folder an atomic writer is still filling."""
    path = Path(path)
    return path.name.startswith(TEMP_PREFIX) or path.parent.name.startswith(TEMP_PREFIX)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(folder: Path) -> None:
    """Permissions from the umask (temp files are made 0600/0700), every file fsync'ed."""
    mask = os.umask(0)
    os.umask(mask)
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    os.chmod(folder, 0o777 & ~mask)
    fsync_dir(folder)


def replace_folder(new: Path, dest: Path) -> None:
    """Rename `new` over `dest`; if the second rename fails the previous `dest` is put back."""
    if not dest.exists():
        os.replace(new, dest)
    else:
        old = dest.with_name(f"{OLD_PREFIX}{dest.name}-{os.getpid()}-{secrets.token_hex(3)}")
        os.replace(dest, old)
        try:
            os.replace(new, dest)
        except BaseException:
            os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dest.parent)


@contextmanager
def atomic_folder(dest: str | Path, carry_over: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside `dest`; on a normal exit it becomes `dest` in one rename.

    carry_over(name) -> True keeps an entry of an existing `dest` that the new folder does not write
    (e.g. a tokenizer.json beside the weights). Any exception removes the temp folder and leaves
    `dest` as it was.
    """
    dest = Path(dest)
    if is_temp(dest):  # already inside an atomic write (its writer publishes the whole tree)
        dest.mkdir(parents=True, exist_ok=True)
        yield dest
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{TEMP_PREFIX}{dest.name}-{os.getpid()}-{secrets.token_hex(3)}")
    tmp.mkdir()
    try:
        yield tmp
        if carry_over is not None and dest.is_dir():
            for f in dest.iterdir():
                if carry_over(f.name) and not (tmp / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        _publish(tmp)
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_temps(folder: str | Path) -> None:
    """Remove the temp and swap folders a crashed writer left in `folder`."""
    for p in Path(folder).glob(".*"):
        if p.name.startswith((TEMP_PREFIX, OLD_PREFIX)) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
