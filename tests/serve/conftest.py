"""Session fixtures: one tiny checkpoint, one server process (with an API key) for the whole package,
and the in-process reference (the same checkpoint through `Engine.generate` and plain forwards)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from dsv2 import DeepseekV2  # noqa: E402
from dsv2.engine import Engine, SamplingParams  # noqa: E402
from dsv2.train.data import load_tokenizer  # noqa: E402

from ._server import API_KEY, Server, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture(scope="session")
def server(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(ckpt, "--api-key", API_KEY, "--max-batch", "64", "--kv-memory", "64MiB",
                 log=tmp_path_factory.mktemp("serve-log") / "server.log")
    try:
        yield srv
    finally:
        rc = srv.stop()
        assert rc == 0, f"server exit status {rc}: {srv.log.read_text()[-2000:]}"


@pytest.fixture(scope="session")
def client(server: Server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="session")
def aclient(server: Server):
    return openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


class Reference:
    """The checkpoint in this process: tokens from Engine.generate, log-probabilities from model(ids)."""

    def __init__(self, folder: Path) -> None:
        self.model = DeepseekV2.from_pretrained(folder, dtype=torch.float32).eval()
        self.tok = load_tokenizer(folder)
        self.eos = self.model.config.eos_token_id
        self.name, self.folder = folder.name, folder

    def generate(self, prompts: list[list[int]], **kw) -> list[list[int]]:
        kw.setdefault("stop_token_ids", (self.eos,))
        params = [SamplingParams(**{k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()})
                  for i in range(len(prompts))]
        return Engine(self.model, max_tokens=8192).generate(prompts, params)

    def chat_ids(self, conversations: list[list[dict]] | list[dict]) -> list[list[int]]:
        """Prompts as transformers renders the folder's chat template (the independent reference)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.folder))
        return [list(tok.apply_chat_template(c if isinstance(c, list) else [c], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) for c in conversations]

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """log-softmax of the model's logits over the whole sequence (T, V): row t scores token t+1."""
        return torch.log_softmax(self.model(torch.tensor([ids]))[0].double(), dim=-1)


@pytest.fixture(scope="session")
def ref(ckpt: Path) -> Reference:
    return Reference(ckpt)
