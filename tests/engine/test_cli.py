"""`dsv2 generate` end to end on a tiny checkpoint with its own tokenizer.json."""

from __future__ import annotations

import pytest

from dsv2.config import ModelConfig
from dsv2.engine import Engine, SamplingParams
from dsv2.engine.cli import main
from dsv2.model import DeepseekV2

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(folder / "tokenizer.json"))
    cfg = ModelConfig.from_preset("tiny")
    model = DeepseekV2(cfg)
    model.reset_parameters(seed=3)
    model.save_pretrained(folder)
    return folder, tok, model


def test_generate_command_streams_text_and_reports(checkpoint, capsys) -> None:
    folder, tok, model = checkpoint
    rc = main(["--model", str(folder), "--prompt", "To be, or not", "--max-new-tokens", "12", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert rc == 0
    ids = tok.encode("To be, or not").ids
    expect = Engine(model.eval(), max_tokens=64).generate([ids], SamplingParams(max_new_tokens=12))[0]
    assert out.strip() == tok.decode(expect).strip()
    assert "tokens/s" in err and "12 tokens in" in err
    per_tok = (32 + 8) * 3 * 4  # (d_c + d_R) x layers x fp32 bytes
    assert f"{per_tok} bytes/token" in err


def test_generate_command_long_prompt_shows_prefill_progress(checkpoint, capsys) -> None:
    """A prompt longer than --prefill-chunk is prefilled in pieces behind a progress bar; same text."""
    folder, tok, model = checkpoint
    prompt = "To be, or not to be, that is the question: whether tis nobler in the mind to suffer"
    ids = tok.encode(prompt).ids
    assert len(ids) > 8
    rc = main(["--model", str(folder), "--prompt", prompt, "--max-new-tokens", "5", "--ignore-eos",
               "--prefill-chunk", "4"])
    out, err = capsys.readouterr()
    assert rc == 0 and "prefill:" in err
    expect = Engine(model.eval(), max_tokens=128).generate([ids], SamplingParams(max_new_tokens=5))[0]
    assert out.strip() == tok.decode(expect).strip()
    rc = main(["--model", str(folder), "--prompt", "To be", "--max-new-tokens", "2", "--prefill-chunk", "64"])
    assert rc == 0 and "prefill:" not in capsys.readouterr().err  # short prompts: no bar


def test_prefill_bar_follows_progress_and_closes() -> None:
    from types import SimpleNamespace

    from dsv2.engine.cli import _PrefillBar

    reqs = [SimpleNamespace(status="running", prefill_progress=0.0) for _ in range(2)]
    bar = _PrefillBar(True)
    reqs[0].prefill_progress = 0.5
    bar.update(reqs)
    assert bar.bar is not None and bar.bar.n == 25
    reqs[0].prefill_progress, reqs[1].status = 1.0, "failed"  # a failed request counts as done
    bar.update(reqs)
    assert bar.bar is None  # closed at 100%
    assert _PrefillBar(False).bar is None


def test_generate_command_batch_and_quantised(checkpoint, capsys) -> None:
    folder, _, _ = checkpoint
    rc = main(["--model", str(folder), "--prompt", "whether", "--prompt", "the slings and arrows",
               "--max-new-tokens", "5", "--kv-cache-dtype", "mixed", "--temperature", "0.7", "--seed", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count("--- ") == 2 and "KV cache mixed" in err


def test_generate_command_int8_activations(checkpoint, capsys) -> None:
    folder, _, _ = checkpoint
    rc = main(["--model", str(folder), "--prompt", "whether", "--max-new-tokens", "4", "--weights", "int4",
               "--group-size", "32", "--int8-activations"])
    out, err = capsys.readouterr()
    assert rc == 0 and "int4 weights, int8 activations" in err and out.strip()
    assert main(["--model", str(folder), "--prompt", "x", "--int8-activations"]) == 2
    assert "EngineConfig.int8_activations" in capsys.readouterr().err


def test_generate_command_errors(checkpoint, tmp_path, capsys) -> None:
    folder, _, _ = checkpoint
    assert main(["--model", str(folder), "--prompt", "x", "--top-p", "0"]) == 2
    assert "SamplingParams.top_p" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["--model", str(folder), "--prompt", "x " * 200, "--max-new-tokens", "100"]) == 2
    assert "too long" in capsys.readouterr().err


def test_dsv2_cli_dispatches_generate(checkpoint, capsys) -> None:
    from dsv2.cli import main as dsv2_main

    folder, _, _ = checkpoint
    assert dsv2_main(["generate", "--model", str(folder), "--prompt", "to be", "--max-new-tokens", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().err
