"""Data pipeline (corpus, tokenizer, packing, batch order), the LR schedules and the AdamW groups."""

from __future__ import annotations

import json

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.train import data, optim


def test_default_corpus_needs_no_download() -> None:
    docs = data.default_corpus()
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000
    assert docs == data.load_documents(None)


def test_tokenizer_is_deterministic_byte_level_and_roundtrips(tmp_path) -> None:
    docs = data.default_corpus()[:20]
    tok = data.train_tokenizer(docs, 600)
    assert tok.to_str() == data.train_tokenizer(docs, 600).to_str()
    assert [tok.token_to_id(s) for s in data.SPECIAL_TOKENS] == [0, 1, 2]
    assert data.special_ids(tok) == (1, 2)
    text = "naïve café ☕ — unseen bytes \x00\x7f"
    assert tok.decode(tok.encode(text).ids) == text  # every byte is encodable
    data.save_tokenizer(tok, tmp_path)
    again = data.load_tokenizer(tmp_path)
    assert again.encode(text).ids == tok.encode(text).ids
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|eos|>"


def test_bytes_per_token_counts_exact_utf8_bytes() -> None:
    docs = data.default_corpus()[:10]
    tok = data.train_tokenizer(docs, 500)
    bpt = data.bytes_per_token(tok)
    stream = data.encode_documents(tok, docs)
    assert int(bpt[stream].sum()) == sum(len(d.encode("utf-8")) for d in docs)  # eos counts 0 bytes
    assert (stream == 2).sum() == len(docs)


def test_jsonl_and_text_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    assert data.load_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["plain text document", "one", "two"]
    assert data.load_documents([tmp_path / "c.jsonl"], text_key="body") == ["x"]
    with pytest.raises(data.DataError, match="c.jsonl:1 has no string field 'text'"):
        data.load_documents([tmp_path / "c.jsonl"])


def test_pack_splits_rows_and_holds_out_validation() -> None:
    stream = torch.arange(1000)
    p = data.pack(stream, 9, 0.1)  # rows of 10
    assert p.train.shape == (90, 10) and p.val.shape == (10, 10)
    assert torch.equal(torch.cat([p.train, p.val]).flatten(), stream)
    assert data.pack(torch.arange(25), 9, 0.05).val.shape == (1, 10)  # at least one val row
    with pytest.raises(data.DataError, match="corpus too small"):
        data.pack(torch.arange(15), 9, 0.1)


def test_batch_sampler_covers_each_epoch_and_resumes_exactly() -> None:
    s = data.BatchSampler(10, 4, seed=7)
    first = torch.cat([s.next_indices() for _ in range(5)]).tolist()  # 20 rows = 2 epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    a = data.BatchSampler(10, 4, seed=7)
    for _ in range(3):
        a.next_indices()
    b = data.BatchSampler(10, 4, seed=7)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices().tolist() for _ in range(4)] == [b.next_indices().tolist() for _ in range(4)]
    assert data.BatchSampler(10, 4, seed=8).next_indices().tolist() != first[:4]


def test_step_schedule_is_the_papers() -> None:
    kw = dict(lr=1.0, total_steps=100, warmup=10, schedule="step")
    assert optim.lr_at(0, **kw) == pytest.approx(0.1)
    assert optim.lr_at(9, **kw) == pytest.approx(1.0)
    assert optim.lr_at(59, **kw) == 1.0
    assert optim.lr_at(60, **kw) == pytest.approx(0.316)
    assert optim.lr_at(89, **kw) == pytest.approx(0.316)
    assert optim.lr_at(90, **kw) == pytest.approx(0.316 ** 2)
    assert optim.lr_at(99, **kw) == pytest.approx(0.316 ** 2)


def test_cosine_schedule_ends_at_min_ratio() -> None:
    kw = dict(lr=2.0, total_steps=50, warmup=5, schedule="cosine", min_lr_ratio=0.1)
    assert optim.lr_at(5, **kw) == pytest.approx(2.0)
    assert optim.lr_at(49, **kw) == pytest.approx(0.2)
    lrs = [optim.lr_at(s, **kw) for s in range(5, 50)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


def test_weight_decay_on_matrices_only() -> None:
    model = DeepseekV2(ModelConfig.from_preset("tiny"))
    opt = optim.build_optimizer(model, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
