"""The training loop end to end on the tiny preset: loss goes down, --resume reproduces the
uninterrupted run exactly, checkpoints are atomic and load in transformers, bad input fails early."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.precision import CpuLinear, native_low_precision
from dsv2.train import ckpt, trainer
from dsv2.train.cli import build_parser, main
from dsv2.train.trainer import TrainArgs, prepare, train

DETERMINISTIC_KEYS = ("loss", "aux_loss", "expert_loss", "device_loss", "comm_loss", "load_max_mean",
                      "load_entropy", "dropped_frac", "grad_norm", "lr", "val_loss", "val_bpb")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """~40 KB of structured English-like text: small enough to tokenize in a blink, regular enough
    that a 0.3M-parameter model learns it within a few dozen steps."""
    animals = ["fox", "dog", "cat", "owl", "bee", "eel", "yak"]
    verbs = ["jumps over", "runs past", "sleeps near", "looks at"]
    lines = [f"The {animals[i % 7]} {verbs[i % 4]} the {animals[(3 * i + 1) % 7]} number {i % 13}."
             for i in range(1200)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines))
    return str(path)


def tiny_args(out: Path, corpus: str, **kw) -> TrainArgs:
    base = dict(preset="tiny", out=str(out), data=[corpus], steps=8, seq_len=32, batch_size=4, vocab_size=512,
                eval_every=4, eval_batches=2, progress=False, log_every=1000, lr=3e-3, warmup=2)
    base.update(kw)
    return TrainArgs(**base)


def curve(history: list[dict]) -> list[tuple]:
    return [tuple(h.get(k) for k in ("step", *DETERMINISTIC_KEYS)) for h in history]


def test_loss_decreases_within_a_few_dozen_steps(tmp_path, corpus) -> None:
    s = train(prepare(tiny_args(tmp_path, corpus, steps=20, lr=5e-3, warmup=4, eval_every=0, schedule="constant")))
    losses = [h["loss"] for h in json.loads("[" + ",".join(
        (tmp_path / "metrics.jsonl").read_text().splitlines()) + "]")]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 2.0, f"loss {first:.3f} -> {last:.3f}"
    assert s["val_loss"] < first
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus) -> None:
    kw = dict(grad_accum=2, capacity_factor=1.0, schedule="step")
    train(prepare(tiny_args(tmp_path / "full", corpus, **kw)))
    full = ckpt.load_state(tmp_path / "full" / "latest")["history"]
    # interrupted at step 3 (checkpoint written on the way out), then continued with --resume
    s = train(prepare(tiny_args(tmp_path / "part", corpus, stop_at=3, **kw)))
    assert s["steps"] == 3 and s["interrupted"]
    train(prepare(tiny_args(tmp_path / "part", corpus, resume="auto", **kw)))
    part = ckpt.load_state(tmp_path / "part" / "latest")["history"]
    assert len(full) == len(part) == 8
    assert curve(part) == curve(full)  # bitwise: same floats
    assert any(h["dropped_frac"] > 0 for h in full)
    a = DeepseekV2.from_pretrained(tmp_path / "full" / "latest", dtype=torch.float32).state_dict()
    b = DeepseekV2.from_pretrained(tmp_path / "part" / "latest", dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))


def test_statistics_are_read_only_at_log_points_with_the_same_values(tmp_path, corpus, monkeypatch) -> None:
    """The trainer reads its step statistics from the device only at log points (--log-every, evaluation,
    checkpoint, last step), all pending steps at once; metrics.jsonl still holds every step, with the values
    of a run that reads them every step."""
    kw = dict(steps=7, grad_accum=2, capacity_factor=1.0, eval_every=0, save_every=5)
    every = train(prepare(tiny_args(tmp_path / "every", corpus, log_every=1, **kw)))
    reads: list[list[int]] = []
    real = trainer.read_stats

    def spy(steps, a, pctx):
        out = real(steps, a, pctx)
        assert all(isinstance(st.micro, torch.Tensor) for st in steps)  # still tensors until read here
        reads.append(len(steps))
        return out

    monkeypatch.setattr(trainer, "read_stats", spy)
    lazy = train(prepare(tiny_args(tmp_path / "lazy", corpus, log_every=3, **kw)))
    assert reads == [3, 2, 1, 1]  # steps 1-3 at 3 (log), 4-5 at 5 (save), 6 (log), 7 (last)
    recs = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("every", "lazy")}
    assert [r["step"] for r in recs["lazy"]] == list(range(1, 8))
    assert curve(recs["lazy"]) == curve(recs["every"])  # bitwise: same floats
    assert [list(r) for r in recs["lazy"]] == [list(r) for r in recs["every"]]  # same keys, same order
    assert lazy["train_loss"] == every["train_loss"]


def test_trainer_applies_the_cpu_precision_pass(tmp_path, corpus, monkeypatch) -> None:
    """On a CPU without native bf16 GEMMs the trained model runs dsv2.precision's CpuLinear / CpuExperts
    (bf16 autocast matmuls computed in fp32, instead of PyTorch's 30-50x slower emulated bf16). Where this
    CPU has native bf16 (AVX512-BF16 / AMX), such a CPU is simulated, so the test checks the trainer here too."""
    from dsv2 import parallel, precision

    if native_low_precision(torch.device("cpu"), torch.bfloat16):
        monkeypatch.setattr(precision, "native_low_precision",
                            lambda device, dtype: device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16))
    seen: dict[str, int] = {}
    real = parallel.setup

    def spy(model, **kw):
        for m in model.modules():
            seen[type(m).__name__] = seen.get(type(m).__name__, 0) + 1
        return real(model, **kw)

    monkeypatch.setattr(parallel, "setup", spy)
    s = train(prepare(tiny_args(tmp_path, corpus, steps=2, eval_every=0, dtype="bf16")))
    meta = DeepseekV2(ModelConfig.from_json(tmp_path / "latest"), device="meta")
    n_linear = sum(type(m) is torch.nn.Linear for m in meta.modules())
    assert n_linear > 0 and seen.get("CpuLinear") == n_linear and "Linear" not in seen
    assert seen.get("CpuExperts") == len(meta.moe_layers()) > 0 and "Experts" not in seen
    assert s["steps"] == 2 and s["train_loss"] == s["train_loss"]  # finite, not NaN
    # same parameter names as the plain model: the checkpoint loads (from_pretrained prepares it too: in
    # bf16 its matmuls take the policy; in fp32 there is nothing to swap)
    loaded = DeepseekV2.from_pretrained(tmp_path / "latest", dtype=torch.bfloat16)
    assert list(loaded.state_dict()) == list(meta.state_dict())
    assert sum(type(m) is CpuLinear for m in loaded.modules()) == n_linear
    plain = DeepseekV2.from_pretrained(tmp_path / "latest", dtype=torch.float32)
    assert sum(type(m) is torch.nn.Linear for m in plain.modules()) == n_linear


def test_checkpoint_loads_in_transformers_with_matching_logits(tmp_path, corpus) -> None:
    transformers = pytest.importorskip("transformers")
    train(prepare(tiny_args(tmp_path, corpus, steps=3, eval_every=0)))
    folder = tmp_path / "latest"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"):
        assert (folder / name).exists(), name
    ours = DeepseekV2.from_pretrained(folder, dtype=torch.float32)
    # a decisive router: a freshly trained tiny router is near-uniform, and near-ties between two
    # correct implementations can pick different experts. Scale it in both copies.
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for i, moe in enumerate(ours.moe_layers(), start=ours.config.first_k_dense_replace):
            moe.gate.weight.mul_(30)
            hf.model.layers[i].mlp.gate.weight.mul_(30)
    ids = torch.randint(3, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "<|eos|>" and tok.decode(tok("def f(x):").input_ids) == "def f(x):"


def test_crash_mid_save_leaves_previous_checkpoint_intact(tmp_path) -> None:
    good = ckpt.save_checkpoint(tmp_path, 1, lambda d: (d / ckpt.STATE_FILE).write_text("one"))

    def boom(d: Path) -> None:
        (d / ckpt.STATE_FILE).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, boom)
    assert (tmp_path / "latest").resolve() == good.resolve()
    assert (good / ckpt.STATE_FILE).read_text() == "one"
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert ckpt.find_resume_dir(tmp_path) == good.resolve()
    ckpt.clean_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", good.name]
    for step in (2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, lambda d: (d / ckpt.STATE_FILE).write_text("x"), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert os.readlink(tmp_path / "latest") == "step-000004"


# ---- bad input: a clear error and exit code 2 before any training ------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


BASE = ["--preset", "tiny", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "2", "--no-progress"]


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"), ("empty", "file is empty"), ("small", "corpus too small"),
    ("steps0", "--steps must be >= 1"), ("unwritable", "is not a writable folder"),
    ("folder", "is a folder"), ("badjson", "not valid JSON"),
])
def test_bad_input_fails_before_training(tmp_path, capsys, corpus, case: str, message: str) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "small.txt").write_text("just a few words")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "afile").write_text("x")
    args = {
        "missing": ["--data", str(tmp_path / "nope.txt")],
        "empty": ["--data", str(tmp_path / "empty.txt")],
        "small": ["--data", str(tmp_path / "small.txt")],
        "steps0": ["--data", corpus, "--steps", "0"],
        "unwritable": ["--data", corpus, "--out", str(tmp_path / "afile" / "sub")],
        "folder": ["--data", str(tmp_path)],
        "badjson": ["--data", str(tmp_path / "bad.jsonl")],
    }[case]
    argv = BASE + ["--out", str(out), "--steps", "2"] + args
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert message in err, err
    assert not list(out.glob("step-*")) and not (out / "metrics.jsonl").exists()


def test_resume_from_another_config_is_refused(tmp_path, capsys, corpus) -> None:
    train(prepare(tiny_args(tmp_path / "a", corpus, steps=1, eval_every=0)))
    base = BASE + ["--data", corpus, "--out", str(tmp_path / "b"), "--steps", "4"]
    argv = base + ["--resume", str(tmp_path / "a"), "--override", "hidden_size=32"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "another configuration" in err and "hidden_size" in err, err
    code, err = run_cli(base + ["--seq-len", "16", "--resume", str(tmp_path / "a")], capsys)
    assert code == 2 and "--seq-len" in err, err
    code, err = run_cli(base + ["--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err, err
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_help_documents_every_flag() -> None:
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 35
    for a in flags:
        assert a.help and len(a.help) > 10, f"{a.option_strings} has no help"
    text = parser.format_help()
    for flag in ("--preset", "--data", "--steps", "--out", "--attention", "--dense", "--seq-len",
                 "--batch-size", "--grad-accum", "--lr", "--warmup", "--schedule", "--eval-every",
                 "--save-every", "--seed", "--dtype", "--capacity-factor", "--resume", "--tokenizer",
                 "--vocab-size"):
        assert flag in text
    ns = parser.parse_args(["--override", "hidden_size=32", "--override", "topk_method=greedy"])
    assert dict(ns.override) == {"hidden_size": 32, "topk_method": "greedy"}
