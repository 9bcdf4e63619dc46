"""Single-process checks of the parallel API: launcher command lines, batch sharding, clear errors."""

from __future__ import annotations

import pytest
import torch

from dsv2 import parallel
from dsv2.parallel.dist import env_world

from . import common


def test_strip_nproc_and_torchrun_command():
    assert parallel.strip_nproc(["--nproc", "2", "--steps", "3"]) == (2, ["--steps", "3"])
    assert parallel.strip_nproc(["--steps", "3", "--nproc=4"]) == (4, ["--steps", "3"])
    assert parallel.strip_nproc(["--steps", "3"]) == (None, ["--steps", "3"])
    for bad in (["--nproc", "0"], ["--nproc=x"], ["--nproc"]):
        with pytest.raises(ValueError, match="--nproc"):
            parallel.strip_nproc(bad)
    cmd = parallel.torchrun_command(2, ["--steps", "3"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "--max_restarts=0",
                       "-m", "dsv2.train", "--steps", "3"]
    multi = parallel.torchrun_command(8, [], nnodes=2, node_rank=1, master="h0:29500")
    assert "--nnodes=2" in multi and "--node_rank=1" in multi and "--rdzv_endpoint=h0:29500" in multi


def test_maybe_launch_without_nproc_returns_args(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.maybe_launch(["--steps", "3", "--nproc", "1"]) == ["--steps", "3"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under torchrun: never re-launch
    assert parallel.maybe_launch(["--nproc", "2", "--steps", "3"]) == ["--steps", "3"]


def test_single_process_context_and_sharding(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = parallel.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    rows = torch.arange(12).view(6, 2)
    assert torch.equal(ctx.shard_batch(rows), rows)
    two = parallel.ParallelContext(rank=1, world_size=2)
    assert torch.equal(two.shard_batch(rows), rows[3:])
    with pytest.raises(ValueError, match="not divisible by world_size=4"):
        parallel.ParallelContext(rank=0, world_size=4).shard_batch(rows)
    model, ctx = parallel.setup(common.build_model(), mode="none", ctx=ctx)  # one process: unchanged
    assert parallel.export_model(model, ctx) is model


def test_bad_settings_are_clear_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(parallel.DistributedError, match="WORLD_SIZE"):
        env_world()
    with pytest.raises(ValueError, match="parallel mode must be one of"):
        parallel.setup(common.build_model(), mode="zero3", ctx=parallel.ParallelContext())
    with pytest.raises(ValueError, match="mode 'none'"):
        parallel.setup(common.build_model(), mode="none", ctx=parallel.ParallelContext(world_size=2, backend="gloo"))
    moe = common.build_moe(common.config(n_group=2))
    with pytest.raises(ValueError, match="n_routed_experts=8 is not divisible by world_size=3"):
        parallel.ExpertParallelMoE(moe, parallel.ParallelContext(world_size=3))
    with pytest.raises(ValueError, match="n_group=2 is not a multiple of world_size=4"):
        parallel.ExpertParallelMoE(moe, parallel.ParallelContext(world_size=4))
    with pytest.raises(ValueError, match="needs a process group"):
        parallel.apply_expert_parallel(common.build_model(), parallel.ParallelContext())


def test_train_cli_fails_fast_when_a_collective_breaks(monkeypatch, capsys):
    """`dsv2 train` runs training inside parallel.failfast(): in a process group, a collective broken by a
    dead peer (raised here by a stub trainer, as gloo raises it) prints one line naming the rank and exits
    1 at once; any other error propagates unchanged."""
    import dsv2.parallel.dist as pdist
    from dsv2.train import cli, trainer

    def broken(prep):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:32161: Connection reset by peer")

    def exit_now(code: int):
        raise SystemExit(code)

    monkeypatch.setattr(trainer, "prepare", lambda args: args)
    monkeypatch.setattr(trainer, "train", broken)
    monkeypatch.setattr(pdist.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pdist.dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(pdist.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(pdist.os, "_exit", exit_now)
    with pytest.raises(SystemExit) as e:
        cli.main(["--steps", "1"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "dsv2 parallel: error: rank 1/2: training failed" in err and "Connection reset by peer" in err, err

    def bug(prep):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)")

    monkeypatch.setattr(trainer, "train", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.main(["--steps", "1"])
