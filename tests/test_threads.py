"""dsv2.threads.pick_threads: the thread count asked for, else torch's capped at the idle cores."""

from __future__ import annotations

import pytest

from dsv2.threads import ThreadCountError, idle_cores, pick_threads


def test_requested_wins() -> None:
    assert pick_threads(3, cores=2, load=5.0, default=2) == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_request_is_named(bad: object) -> None:
    with pytest.raises(ThreadCountError, match="thread count must be an integer >= 1"):
        pick_threads(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("cores", "load", "default", "want"), [
    (2, 0.0, 2, 2),  # quiet: torch's default
    (2, 1.0, 2, 1),  # one other busy process: one thread
    (2, 3.7, 2, 1),  # overloaded: never below 1
    (16, 4.2, 16, 12),
    (16, 0.0, 4, 4),  # never above torch's default (OMP_NUM_THREADS, set_num_threads)
    (4, 0.4, 8, 4),  # never above the cores
])
def test_default_capped_at_idle_cores(cores: int, load: float, default: int, want: int) -> None:
    assert pick_threads(None, cores=cores, load=load, default=default) == want


def test_idle_cores_reads_this_machine() -> None:
    import os

    n = idle_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_engine_flags() -> None:
    import argparse

    from dsv2.engine.cli import add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    a = p.parse_args(["--threads", "3", "--no-resident"])
    assert (a.threads, a.no_resident) == (3, True)
    a = p.parse_args([])
    assert (a.threads, a.no_resident) == (None, False)


def test_generate_sets_and_prints_threads(tmp_path, capsys) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from dsv2.config import ModelConfig
    from dsv2.engine.cli import main
    from dsv2.model import DeepseekV2

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["to be or not to be"] * 4, trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    DeepseekV2(ModelConfig.from_preset("tiny")).save_pretrained(tmp_path)
    base = ["--model", str(tmp_path), "--prompt", "to be", "--max-new-tokens", "2", "--ignore-eos"]
    assert main([*base, "--threads", "1", "--no-resident"]) == 0
    assert ", 1 threads, " in capsys.readouterr().err and torch.get_num_threads() == 1
    assert main([*base, "--threads", "0"]) == 2
    assert "--threads: thread count must be an integer >= 1, got 0" in capsys.readouterr().err
