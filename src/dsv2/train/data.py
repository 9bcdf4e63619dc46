"""Training data: corpus loading, byte-level BPE tokenizer, packing and the train/val split.

Shape legend: N sequences, L = seq_len, B batch.

Everything here is deterministic: the same files, vocab size and seed give the same tokenizer,
the same packed sequences and the same batch order, which is what exact `--resume` relies on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 0, 1, 2 (the small/tiny presets' bos/eos)
DEFAULT_CORPUS = "pydoc"  # sentinel: CPython's bundled documentation text


class DataError(ValueError):
    """Bad training data (missing/empty file, corpus too small, ...); raised before training starts."""


# ---- corpus -------------------------------------------------------------------------------------
def default_corpus() -> list[str]:
    """The English documentation that ships inside every CPython (`pydoc_data.topics`): no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distro Pythons split pydoc_data out
        raise DataError("the default corpus needs CPython's pydoc_data module, which this Python "
                        "lacks; pass --data PATH instead") from e
    return [topics[k] for k in sorted(topics)]


def load_documents(paths: Sequence[str | Path] | None, text_key: str = "text") -> list[str]:
    """Read text files (one document each) or JSONL files (one document per line, field `text_key`)."""
    if not paths:
        return default_corpus()
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"--data: file not found: {p}")
        if p.is_dir():
            raise DataError(f"--data: {p} is a folder; pass the files inside it")
        text = p.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise DataError(f"--data: file is empty: {p}")
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            docs.extend(_jsonl_documents(p, text, text_key))
        else:
            docs.append(text)
    return docs


def _jsonl_documents(path: Path, text: str, key: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"--data: {path}:{n} is not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
            raise DataError(f"--data: {path}:{n} has no string field {key!r} (set --text-key)")
        if rec[key]:
            out.append(rec[key])
    if not out:
        raise DataError(f"--data: {path} holds no non-empty {key!r} fields")
    return out


# ---- tokenizer ----------------------------------------------------------------------------------
def train_tokenizer(docs: Sequence[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style, every byte encodable) with <|pad|>, <|bos|>, <|eos|> at ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_min = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_min:
        raise DataError(f"--vocab-size must be >= {n_min} (3 special tokens + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise DataError(f"--tokenizer: no tokenizer.json at {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"--tokenizer: cannot read {p}: {e}") from e


def special_ids(tok) -> tuple[int | None, int | None]:
    """(bos, eos) ids of a tokenizer: ours, or the usual names of other byte-level tokenizers."""
    def first(names: Sequence[str]) -> int | None:
        for n in names:
            i = tok.token_to_id(n)
            if i is not None:
                return i
        return None
    bos = first(["<|bos|>", "<s>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "<|endoftext|>"])
    eos = first(["<|eos|>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|endoftext|>"])
    return bos, eos


def save_tokenizer(tok, folder: str | Path) -> None:
    """tokenizer.json plus a tokenizer_config.json so transformers' AutoTokenizer also loads it."""
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    bos, eos = special_ids(tok)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": 1_000_000}
    if bos is not None:
        cfg["bos_token"] = tok.id_to_token(bos)
    if eos is not None:
        cfg["eos_token"] = tok.id_to_token(eos)
    if tok.token_to_id("<|pad|>") is not None:
        cfg["pad_token"] = "<|pad|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def bytes_per_token(tok) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens): the denominator of bits/byte."""
    byte_of = byte_level_chars()
    specials = {tok.token_to_id(s) for s in SPECIAL_TOKENS} | set(special_ids(tok))
    n = tok.get_vocab_size()
    out = torch.zeros(n, dtype=torch.int64)
    for i in range(n):
        if i in specials:
            continue
        s = tok.id_to_token(i)
        if s is None:
            continue
        if all(c in byte_of for c in s):  # byte-level BPE: one char per byte
            out[i] = len(s)
        else:
            out[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


def byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's vocab characters -> the byte each stands for (a token string of only such
    characters is that many raw bytes)."""
    return {c: b for b, c in _bytes_to_unicode().items()}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable-char map that byte-level BPE uses for its vocab strings
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---- packing ------------------------------------------------------------------------------------
@dataclass
class PackedData:
    """Fixed-length sequences of seq_len + 1 tokens (inputs = [:-1], targets = [1:])."""

    train: torch.Tensor  # (N_train, L+1) int64
    val: torch.Tensor  # (N_val, L+1) int64
    fingerprint: str  # sha256 of the token stream: resume checks it is the same data
    n_tokens: int

    @property
    def seq_len(self) -> int:
        return self.train.shape[1] - 1


def encode_documents(tok, docs: Sequence[str]) -> torch.Tensor:
    """One token stream: each document followed by <eos> (the document separator)."""
    _, eos = special_ids(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs), add_special_tokens=False):
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def pack(stream: torch.Tensor, seq_len: int, val_frac: float) -> PackedData:
    """Cut the stream into (seq_len+1)-token rows; the last `val_frac` of rows (>= 1) is validation."""
    if seq_len < 1:
        raise DataError(f"--seq-len must be >= 1, got {seq_len}")
    if not 0.0 < val_frac < 1.0:
        raise DataError(f"--val-frac must be in (0, 1), got {val_frac}")
    row = seq_len + 1
    n = stream.numel() // row
    if n < 2:
        raise DataError(f"corpus too small: {stream.numel()} tokens make {n} sequence(s) of "
                        f"--seq-len {seq_len} (+1 target); need at least 2 (1 train + 1 validation). "
                        "Add data or lower --seq-len.")
    rows = stream[: n * row].view(n, row)  # (N, L+1)
    n_val = max(1, math.ceil(n * val_frac))
    n_val = min(n_val, n - 1)
    digest = hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:16]
    return PackedData(train=rows[: n - n_val].clone(), val=rows[n - n_val:].clone(),
                      fingerprint=f"{digest}-L{seq_len}-v{n_val}", n_tokens=stream.numel())


# ---- batches ------------------------------------------------------------------------------------
class BatchSampler:
    """Shuffled batches over the train rows, epoch after epoch; the position is checkpointable.

    Epoch e visits a permutation drawn from a generator seeded with (seed, e), so a resumed run
    only needs (epoch, cursor) to continue with exactly the same batches.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {batch_size}")
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_rows, generator=g)

    def next_indices(self) -> torch.Tensor:
        """Row indices of the next batch (B,); the tail of one epoch may be topped up from the next"""
        idx = []
        while len(idx) < self.batch_size:
            if self.cursor >= self.n_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - len(idx), self.n_rows - self.cursor)
            idx.extend(self._perm[self.cursor: self.cursor + take].tolist())
            self.cursor += take
        return torch.tensor(idx, dtype=torch.int64)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_rows": self.n_rows,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, s: dict[str, int]) -> None:
        if (s["n_rows"], s["batch_size"]) != (self.n_rows, self.batch_size):
            raise DataError(f"resume: data position is for {s['n_rows']} rows / batch {s['batch_size']}, "
                            f"this run has {self.n_rows} rows / batch {self.batch_size}")
        self.epoch, self.cursor = s["epoch"], s["cursor"]
        self._perm = self._permutation(self.epoch)


def val_batches(val: torch.Tensor, batch_size: int, max_batches: int | None) -> Iterator[torch.Tensor]:
    """Fixed, in-order validation batches (the same tokens at every evaluation)."""
    n = val.shape[0]
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    for i in range(0, n, batch_size):
        yield val[i: i + batch_size]
