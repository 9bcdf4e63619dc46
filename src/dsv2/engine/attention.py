"""Decode-time attention over the paged cache, and the cache-protocol views the model's modules use.

Shapes: B sequences, T new tokens, S cached tokens of one sequence, n rows of one chunk, H heads,
Hkv baseline K/V heads, G = H / Hkv, Dh baseline head dim, C kv_lora_rank, R rope dim, W row width.

Decode reads a sequence's rows chunk by chunk (each chunk a zero-copy slice of the pool when the
storage is plain) and merges the chunks with an online softmax (flash-decoding). On a CPU with bf16
rows the chunks are upcast to fp32 one at a time while they sit in cache, because bf16 GEMMs without
AVX512-BF16 are several times slower than converting and running fp32 GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from dsv2.engine.cache import PagedCache, SeqSlots


def rows_from_new(new: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Model cache entries -> rows (N, W). MLA: (c_kv (B,T,C), k_pe (B,T,R)); baselines: (k, v) (B,T,Hkv,Dh)."""
    a, b = new
    return torch.cat((a.flatten(2), b.flatten(2)), dim=-1).flatten(0, 1)  # (B*T, W)


def new_from_rows(rows: torch.Tensor, cache: PagedCache, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """rows (B, S, W) -> the model's cache tuple, as views of `rows` (so MLA can attend to one row)."""
    if cache.split is not None:
        return rows[..., : cache.split], rows[..., cache.split:]
    half = cache.width // 2
    hkv, dh = shape[-2], shape[-1]
    return rows[..., :half].unflatten(-1, (hkv, dh)), rows[..., half:].unflatten(-1, (hkv, dh))


class SequenceView:
    """Cache protocol for one sequence (prefill): append T rows at `start`, return all start+T rows."""

    def __init__(self, cache: PagedCache, seq: SeqSlots, start: int) -> None:
        self.cache, self.seq, self.start = cache, seq, start

    def __len__(self) -> int:
        return self.start

    def update(self, layer_idx: int, new: tuple[torch.Tensor, ...]
               ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        rows = rows_from_new(new)  # (T, W)
        t = rows.shape[0]
        self.cache.write(layer_idx, self.cache.slots(self.seq, self.start, t), rows)
        if self.cache.format.plain:
            every = self.cache.read(layer_idx, self.seq, self.start + t)  # zero-copy when contiguous
        else:  # the new rows at full precision, the cached ones as stored
            old = self.cache.read(layer_idx, self.seq, self.start)
            every = torch.cat((old, rows.to(old.dtype)), dim=0)
        return new_from_rows(every[None], self.cache, new[0].shape), None  # causal, queries last


class BatchView:
    """Cache protocol for a decode batch of sequences of different lengths, in the model's own modules.

    Writes the batch's new rows with one scatter and reads every sequence's rows with one gather per
    layer into a padded (B, S_max, W) tensor plus a (B,1,T,S_max) mask (padding zeroed): a copy per
    step, which the CPU fast path (`latent_decode`) avoids, but a handful of kernels for any batch,
    which is what a GPU wants. Also the reference the fast path is tested against.
    """

    def __init__(self, cache: PagedCache, seqs: list[SeqSlots], starts: list[int]) -> None:
        self.cache, self.seqs, self.starts = cache, seqs, starts
        self._plan: tuple[torch.Tensor, ...] | None = None  # (new slots, gather index, valid, mask), per step
        self._plan_t = -1

    def _plan_for(self, t: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Slot indices of the new rows and of every row (on the cache's device), built once per step:
        the same for every layer."""
        if self._plan is None or self._plan_t != t:
            lens = [s + t for s in self.starts]
            s_max = max(lens)
            new = torch.cat([self.cache.slots(seq, st, t) for seq, st in zip(self.seqs, self.starts)])  # (B*T,)
            index = torch.zeros(len(self.seqs), s_max, dtype=torch.long)  # (B,S_max), padding -> slot 0
            for i, (seq, n) in enumerate(zip(self.seqs, lens)):
                index[i, :n] = self.cache.slots(seq, 0, n)
            key = torch.arange(s_max)
            valid = key[None, :] < torch.tensor(lens)[:, None]  # (B,S_max)
            q_pos = torch.tensor(self.starts)[:, None] + torch.arange(t)[None, :]  # (B,T)
            mask = (key[None, None, :] <= q_pos[:, :, None])[:, None]  # (B,1,T,S_max)
            self._plan = (new.to(device), index.to(device), valid.to(device), mask.to(device))
            self._plan_t = t
        return self._plan

    def update(self, layer_idx: int, new: tuple[torch.Tensor, ...]
               ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        b, t = new[0].shape[:2]
        rows = rows_from_new(new).view(b, t, -1)  # (B,T,W)
        if b == 1:  # one sequence: its rows as they are (zero-copy when contiguous), plain causal
            seq, start = self.seqs[0], self.starts[0]
            self.cache.write(layer_idx, self.cache.slots(seq, start, t), rows[0])
            every = self.cache.read(layer_idx, seq, start + t)[None]  # (1,S,W)
            return new_from_rows(every, self.cache, new[0].shape), None
        slots, index, valid, mask = self._plan_for(t, rows.device)
        self.cache.write(layer_idx, slots, rows.flatten(0, 1))
        every = self.cache.gather(layer_idx, index).masked_fill_(~valid[..., None], 0)  # (B,S_max,W)
        return new_from_rows(every.to(rows.dtype), self.cache, new[0].shape), mask


def _upcaster(upcast: bool, scratch: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows -> rows to compute on: as they are, or fp32 (into `scratch` when given: a fresh 2 MiB tensor
    per chunk costs more in page faults than the conversion itself)."""
    if not upcast:
        return lambda k: k
    if scratch is None:
        return lambda k: k.float()
    return lambda k: scratch[: k.shape[0]].copy_(k)


def latent_decode(q: torch.Tensor, chunks: list[torch.Tensor], c: int, scale: float,
                  upcast: bool, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA attention of one sequence: q (H, C+R) against rows (n, C+R) -> latent output (H, C).

    scores = q · row (the latent *is* the key, shared by every head), values = the first C columns.
    `scratch` (>= n, C+R) fp32, if given, receives each upcast chunk in turn (chunks are used one at a time).
    """
    # scores as (rows @ qᵀ)ᵀ: MKL runs the tall (n, C+R) x (C+R, H) product well; q @ rowsᵀ with only
    # H = 16 rows in q falls on its slower small-M path
    prep = _upcaster(upcast, scratch)
    if len(chunks) == 1:
        k = prep(chunks[0])
        p = (k @ q.to(k.dtype).T).T.float().mul_(scale).softmax(dim=-1)  # (H,S)
        return p.to(k.dtype) @ k[:, :c]  # (H,C)

    def pieces() -> Iterator[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
        for rows in chunks:
            k = prep(rows)
            s = (k @ q.to(k.dtype).T).T.float().mul_(scale)  # (H,n)
            yield s, lambda p, k=k: p.to(k.dtype) @ k[:, :c]  # (H,C)

    return online_softmax(pieces())


def grouped_decode(q: torch.Tensor, chunks: list[torch.Tensor], n_kv: int, scale: float,
                   upcast: bool, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Baseline attention of one sequence: q (H, Dh) against rows (n, 2·Hkv·Dh) = [k ; v] -> (H, Dh)."""
    h, dh = q.shape
    qg = q.view(n_kv, h // n_kv, dh)  # (Hkv,G,Dh)
    half = n_kv * dh
    prep = _upcaster(upcast, scratch)

    def pieces() -> Iterator[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
        for rows in chunks:
            rows = prep(rows)
            k = rows[:, :half].unflatten(-1, (n_kv, dh)).permute(1, 2, 0)  # (Hkv,Dh,n)
            v = rows[:, half:].unflatten(-1, (n_kv, dh)).transpose(0, 1)  # (Hkv,n,Dh)
            s = torch.bmm(qg.to(k.dtype), k).float().mul_(scale)  # (Hkv,G,n)
            yield s, lambda p, v=v: torch.bmm(p.to(v.dtype), v)  # (Hkv,G,Dh)

    return online_softmax(pieces()).view(h, dh)


def online_softmax(pieces: Iterable[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]) -> torch.Tensor:
    """softmax(s) @ V over key chunks, merged flash-decoding style (running max and sum).

    Each piece is (scores (..., n) fp32 already scaled, p -> p @ V_chunk (..., Dv)); returns (..., Dv) fp32.
    """
    m = l_sum = acc = None
    for s, attend in pieces:
        m_new = s.amax(dim=-1, keepdim=True) if m is None else torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = (s - m_new).exp_()
        o = attend(p).float()
        if m is None:
            l_sum, acc = p.sum(dim=-1, keepdim=True), o
        else:
            alpha = (m - m_new).exp_()
            l_sum = l_sum * alpha + p.sum(dim=-1, keepdim=True)
            acc = acc * alpha + o
        m = m_new
    return acc / l_sum


def decode_chunks(cache: PagedCache, layer: int, seq: SeqSlots, length: int, chunk: int) -> list[torch.Tensor]:
    """The rows of tokens [0, length) of `seq` in chunks of at most `chunk` rows."""
    out = []
    for start, n in cache.runs(seq, length):
        for off in range(0, n, chunk):
            out.append(cache.read_run(layer, start + off, min(chunk, n - off)))
    return out
