"""`dsv2 serve` flags: safe defaults (127.0.0.1), the served model name, and clean refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv2.cli import main as dsv2_main
from dsv2.serve.cli import add_serve_args, model_name


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(["--model", "x", *argv])


def test_defaults_bind_localhost_only(monkeypatch) -> None:
    monkeypatch.delenv("DSV2_API_KEY", raising=False)
    a = parse()
    assert (a.host, a.port, a.api_key, a.max_queue, a.max_batch) == ("127.0.0.1", 8000, None, 256, 64)
    assert a.kv_cache_dtype == "auto" and a.dtype == "auto"  # the engine flags `dsv2 generate` has


def test_model_name_from_folder(tmp_path: Path) -> None:
    assert model_name(tmp_path / "runs" / "demo" / "latest") == "demo"
    assert model_name(tmp_path / "runs" / "demo" / "step-300") == "demo"
    assert model_name(tmp_path / "my-ckpt") == "my-ckpt"


def test_missing_tokenizer_and_bad_flags_exit_2(tmp_path: Path, capsys, ckpt) -> None:
    assert dsv2_main(["serve", "--model", str(tmp_path)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert dsv2_main(["serve", "--model", str(ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
