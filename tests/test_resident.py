"""dsv2.resident: memory-mapped weights become anonymous memory; results do not change."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from dsv2.config import ModelConfig
from dsv2.engine import Engine
from dsv2.model import DeepseekV2
from dsv2.resident import file_backed, make_resident


def _maps_path(t: torch.Tensor) -> str | None:
    """Independent reference: the path /proc/self/maps gives for the mapping holding t's first byte."""
    ptr = t.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            return parts[5] if len(parts) == 6 else None
    return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    m = DeepseekV2(ModelConfig.from_preset("tiny"), dtype=torch.float32)
    m.reset_parameters(seed=3)
    m.save_pretrained(d)
    return d


def _load(folder: Path) -> DeepseekV2:
    return DeepseekV2.from_pretrained(folder, dtype=torch.float32).eval()  # stored dtype: kept as mapped views


def test_loaded_weights_are_file_backed_then_resident(folder: Path) -> None:
    model = _load(folder)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        before = model(ids).clone()
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    mapped = file_backed(model)
    assert mapped, "the loader no longer memory-maps: this test needs a file-backed model"
    for name, t in tensors.items():  # agrees with the reference lookup: in a mapping of a checkpoint file or not
        path = _maps_path(t)
        assert (name in mapped) == (path is not None and path.startswith(str(folder))), (name, path)
    nbytes = sum({tensors[n].untyped_storage().data_ptr(): tensors[n].untyped_storage().nbytes()
                  for n in mapped}.values())
    params = {n: p for n, p in model.named_parameters()}
    emb = tensors["embed_tokens.weight"].untyped_storage()
    assert make_resident(model) == nbytes - emb.nbytes()  # the embedding table stays mapped by default
    assert file_backed(model) == ["embed_tokens.weight"]
    assert make_resident(model, keep_embeddings_mapped=False) == emb.nbytes()
    assert file_backed(model) == []
    assert all(params[n] is p for n, p in model.named_parameters())  # same Parameter objects
    for t in [*model.parameters(), *model.buffers()]:
        assert not (_maps_path(t) or "").startswith("/")
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert make_resident(model) == 0  # nothing left to copy


def test_tied_and_views_share_one_copy(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(torch.arange(64, dtype=torch.float32).numpy().tobytes())
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    base = torch.frombuffer(mm, dtype=torch.float32)
    m = torch.nn.Module()
    m.a, m.b = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(8, 4, bias=False)
    m.a.weight = torch.nn.Parameter(base[:32].view(4, 8), requires_grad=False)
    m.b.weight = m.a.weight  # tied
    m.a.register_buffer("tail", base[32:])  # a view of the same storage
    assert sorted(file_backed(m)) == ["a.tail", "a.weight", "b.weight"]
    assert make_resident(m) == 64 * 4  # one storage, copied once
    assert file_backed(m) == [] and m.a.weight is m.b.weight
    assert m.a.tail.untyped_storage().data_ptr() == m.a.weight.untyped_storage().data_ptr()
    assert torch.equal(m.a.tail, torch.arange(32, 64, dtype=torch.float32))
    assert torch.equal(m.a.weight.flatten(), torch.arange(32, dtype=torch.float32))


def test_engine_makes_weights_resident_by_default(folder: Path) -> None:
    model = _load(folder)
    assert file_backed(model)
    Engine(model, max_tokens=64, resident=False)
    assert file_backed(model)  # opted out: left as it was
    eng = Engine(model, max_tokens=64)
    assert eng.resident_bytes > 0 and file_backed(model) == ["embed_tokens.weight"]  # read a row per token
    emb = model.embed_tokens.weight.detach().clone()
    eng = Engine(model, max_tokens=64, resident_embedding=True)  # asked for: the embedding too
    assert eng.resident_bytes == emb.nbytes and file_backed(model) == []
    assert torch.equal(model.embed_tokens.weight, emb)


def test_a_tied_embedding_is_copied(tmp_path: Path) -> None:
    """An embedding tied to lm_head is read whole every step: it is copied like any other weight."""
    m = DeepseekV2(ModelConfig.from_preset("tiny", tie_word_embeddings=True), dtype=torch.float32)
    m.save_pretrained(tmp_path)
    model = _load(tmp_path)
    assert model.lm_head.weight is model.embed_tokens.weight and "embed_tokens.weight" in file_backed(model)
    assert make_resident(model) > 0
    assert file_backed(model) == []


def _mapping_rss_kib(ptr: int) -> int:
    """Independent reference: the Rss /proc/self/smaps gives for the mapping holding address ptr."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("mapping not found")


def test_copied_file_pages_are_given_back_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storage copied in small chunks: its file pages leave the process's RSS, a neighbouring tensor's stay
    mapped and readable, and both read the file's values."""
    import dsv2.resident as resident

    page = resident._PAGE
    n = 64 * page // 4  # 64 pages of fp32
    f = tmp_path / "w.bin"
    f.write_bytes(torch.arange(n, dtype=torch.float32).numpy().tobytes())
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    a = torch.frombuffer(mm, dtype=torch.float32, count=n // 2)  # pages 0-31
    b = torch.frombuffer(mm, dtype=torch.float32, offset=n // 2 * 4)  # pages 32-63, its own storage
    float(a.sum()), float(b.sum())  # every page resident
    ptr = a.untyped_storage().data_ptr()
    assert _mapping_rss_kib(ptr) >= 64 * page // 1024
    m = torch.nn.Module()
    m.register_buffer("a", a)
    monkeypatch.setattr(resident, "_CHUNK", 3 * page)  # 11 chunks, the last one short
    assert make_resident(m) == n // 2 * 4
    assert _mapping_rss_kib(ptr) <= 32 * page // 1024  # only b's pages are left
    assert torch.equal(m.a, torch.arange(n // 2, dtype=torch.float32))
    assert torch.equal(b, torch.arange(n // 2, n, dtype=torch.float32))


def _run_python(code: str) -> str:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


_WHERE_20MIB = """
import sys, torch
from pathlib import Path
{setup}
t = torch.ones(5 << 20)  # 20 MiB: above glibc's initial mmap threshold (128 KiB)
ptr = t.untyped_storage().data_ptr()
for line in Path("/proc/self/maps").read_text().splitlines():
    parts = line.split(maxsplit=5)
    lo, hi = (int(x, 16) for x in parts[0].split("-"))
    if lo <= ptr < hi:
        print(parts[5] if len(parts) == 6 else "anonymous mapping")
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_reuse_freed_memory_serves_big_blocks_from_the_heap() -> None:
    """(Each in a fresh process: the setting is process-wide.) By default glibc maps a 20 MiB block on its own
    (and unmaps it when freed: fresh zeroed pages, faulted in, for every such tensor); after
    `reuse_freed_memory` it comes from the heap, whose freed blocks are reused."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("glibc only")
    assert _run_python(_WHERE_20MIB.format(setup="")) == "anonymous mapping"
    tuned = "from dsv2.resident import reuse_freed_memory\nassert reuse_freed_memory()"
    assert _run_python(_WHERE_20MIB.format(setup=tuned)) == "[heap]"


def test_engine_reuses_freed_memory_unless_told_not_to(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dsv2.engine.engine as engine_mod

    calls = []
    monkeypatch.setattr(engine_mod, "reuse_freed_memory", lambda: calls.append(1) or True)
    model = _load(folder)
    assert not Engine(model, max_tokens=64, reuse_freed_memory=False).malloc_tuned and not calls
    assert Engine(model, max_tokens=64).malloc_tuned and calls == [1]
    from dsv2.engine import EngineConfig, EngineConfigError

    with pytest.raises(EngineConfigError, match="reuse_freed_memory"):
        EngineConfig(reuse_freed_memory=1)


def test_loading_and_an_engine_do_not_import_dynamo(folder: Path) -> None:
    """torch._dynamo costs ~70 MiB of resident memory and ~1 s to import: a process that never compiles must not
    pay it (it was pulled in by a decorator in dsv2.precision and by nn.Embedding's init on the meta device)."""
    out = _run_python(f"""
import sys, torch
import dsv2.cli, dsv2.serve.app
from dsv2.model import DeepseekV2
from dsv2.engine import Engine, SamplingParams
m = DeepseekV2.from_pretrained({str(folder)!r}, dtype=torch.bfloat16)
Engine(m, max_tokens=64).generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
print(sorted(k for k in sys.modules if k.startswith(("torch._dynamo", "torch._inductor"))))
""")
    assert out == "[]"
