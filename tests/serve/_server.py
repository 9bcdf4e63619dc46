"""Helpers for the serve tests: a tiny random-weight checkpoint with a trained tokenizer, and a real
`python -m dsv2.serve` process on 127.0.0.1 with an ephemeral port (always killed in the end)."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.train.data import default_corpus, save_tokenizer, special_ids, train_tokenizer

API_KEY = "sk-test-key"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def make_checkpoint(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A `tiny`-preset model (random weights, 1024-token context) + a 512-token BPE trained on CPython's docs."""
    docs = default_corpus()[:40]
    tok = train_tokenizer(docs, 512)
    bos, eos = special_ids(tok)
    cfg = ModelConfig.from_preset("tiny", vocab_size=512, max_position_embeddings=1024, rope_scaling=None,
                                  bos_token_id=bos, eos_token_id=eos)
    torch.manual_seed(0)
    model = DeepseekV2(cfg)
    with torch.no_grad():  # sharper logits than the 0.02-std init: fewer near-ties, text less uniform
        model.lm_head.weight.mul_(8)
    model.save_pretrained(folder)
    save_tokenizer(tok, folder)
    if chat_template is not None:
        path = folder / "tokenizer_config.json"
        cfg_json = json.loads(path.read_text())
        cfg_json["chat_template"] = chat_template
        path.write_text(json.dumps(cfg_json))
    return folder


class Server:
    """`python -m dsv2.serve --model FOLDER --port 0 ...` with the port read from its stdout."""

    def __init__(self, folder: Path, *args: str, log: Path, start_timeout: float = 90.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = log
        self._log_f = open(log, "w")  # noqa: SIM115 (closed in stop)
        cmd = [sys.executable, "-m", "dsv2.serve", "--model", str(folder), "--host", "127.0.0.1", "--port", "0",
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log_f, text=True, env=env)
        try:
            self.port = self._read_port(start_timeout)
            self.base = f"http://127.0.0.1:{self.port}"
            self._wait_healthy(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _read_port(self, timeout: float) -> int:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if sel.select(0.2):
                line = self.proc.stdout.readline()
                m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
                if m:
                    return int(m.group(1))
        raise TimeoutError("server did not print its address")

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server never became healthy")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get(self, path: str) -> tuple[int, bytes]:
        status, _, data = self.request("GET", path, timeout=5)
        return status, data

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples of /metrics: {'name{labels}': value}."""
        out = {}
        for line in self.get("/metrics")[1].decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        """Signal the server, wait for it (kill it past `timeout`); returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc.stdout.close()
        self._log_f.close()
        return self.proc.returncode
