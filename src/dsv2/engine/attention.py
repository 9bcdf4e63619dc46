"""The engine's attention backend: the model's attention modules hand it their projections, it writes
the new rows into the paged cache and attends over each sequence's rows.

Shapes: N tokens of a step (all sequences, flattened), T new tokens of one sequence, S its cached + new
tokens, n rows of one chunk / key block, H heads, Hkv baseline K/V heads, G = H / Hkv, Dh baseline
head dim, Dn / Dv / R / C MLA nope / value / rope / latent widths, E = Dn + R, W row width.

One step may mix sequences being prefilled (T >= 1 new prompt tokens) with decoding ones (T = 1):
  - a token that is alone (decode) attends *absorbed* over its sequence's latent rows in place:
    W_UK folded into the query, scores against [c_kv ; k_R], W_UV applied to the attended latent
    (`latent_decode`, chunks merged by an online softmax); off the CPU, where launching a dozen small
    kernels per sequence would dominate, all decode rows can be gathered into one padded batch instead;
  - prefill tokens attend *expanded* over the cached prefix one key block at a time (each block's
    K/V decompressed through kv_b_proj, attended by fused SDPA that also returns its log-sum-exp) and
    then causally over their own rows; the blocks are merged by log-sum-exp, so no more than one
    block of decompressed keys ever exists, whatever the prompt's length.
Every query attends to rows as the cache stores them (its own included), so quantised formats are
seen consistently by prefill and decode. On a CPU without native bf16 GEMMs the decode attention runs
in fp32: over bf16 rows in dsv2's C kernel (`native.latent_decode_bf16`), otherwise over upcast chunks of
rows (a reused scratch buffer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from dsv2.engine.cache import PagedCache, slot_runs
from dsv2.quant import native

DECODE_IMPLS = ("auto", "fast", "gathered")


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's share of a step: new tokens [q_start, q_start + q_len) of the flat token list, at
    positions ctx.. (ctx tokens are cached already); runs = (first slot, count) of consecutive cache
    slots holding its tokens [0, ctx + q_len)."""

    q_start: int
    q_len: int
    ctx: int
    runs: tuple[tuple[int, int], ...]


class StepMetadata:
    """Everything attention needs about one step, built once per step (not per layer): the spans, the
    flat slot of every new token (N,) on the cache's device, and which spans decode."""

    def __init__(self, cache: PagedCache, tables: list[list[int]], ctx: list[int], q_lens: list[int]) -> None:
        bs = cache.block_size
        self.spans: list[SeqSpan] = []
        slots: list[int] = []
        start = 0
        for blocks, c, t in zip(tables, ctx, q_lens):
            runs = slot_runs(blocks, c + t, bs)
            self.spans.append(SeqSpan(start, t, c, runs))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(c, c + t))
            start += t
        self.num_tokens = start
        device = cache.pools[0][0].device
        self.slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)  # (N,)
        self.decode = [i for i, s in enumerate(self.spans) if s.q_len == 1]
        self.prefill = [i for i, s in enumerate(self.spans) if s.q_len > 1]
        self.decode_tokens = torch.tensor([self.spans[i].q_start for i in self.decode], dtype=torch.long,
                                          device=device)  # (Bd,)
        self._gather: tuple[torch.Tensor, torch.Tensor] | None = None

    def gather_plan(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For a gathered decode batch: slot index (Bd, S_max) of every row (padding -> slot 0) and the
        valid mask (Bd, S_max)."""
        if self._gather is None:
            lens = [self.spans[i].ctx + 1 for i in self.decode]
            index = torch.zeros(len(lens), max(lens), dtype=torch.long)
            for j, i in enumerate(self.decode):
                index[j, : lens[j]] = torch.cat([torch.arange(s, s + n) for s, n in self.spans[i].runs])
            valid = torch.arange(max(lens))[None, :] < torch.tensor(lens)[:, None]
            self._gather = (index.to(device), valid.to(device))
        return self._gather


def choose_decode_impl(device: torch.device, lengths: list[int]) -> str:
    """decode_impl="auto" for one step. CPU: "fast", per-sequence attention straight over the pool (no
    copy; the CPU runs it as fast as a batch). Elsewhere: "gathered", one padded batch (a few kernels per
    layer instead of ~a dozen per sequence, which would leave a GPU launch-bound), unless padding would
    more than double the rows gathered (one long sequence among short ones)."""
    if device.type == "cpu" or not lengths:
        return "fast"
    return "gathered" if len(lengths) * max(lengths) <= 2 * sum(lengths) + len(lengths) else "fast"


def seq_rows(cache: PagedCache, layer: int, span: SeqSpan, a: int, b: int, chunk: int) -> Iterator[torch.Tensor]:
    """Rows (n, W) of tokens [a, b) of a sequence in pieces of at most `chunk` rows, in order: zero-copy
    views of the pool for plain formats, decoded copies otherwise."""
    pos = 0
    for start, n in span.runs:
        lo, hi = max(a, pos), min(b, pos + n)
        for off in range(lo, hi, chunk):
            yield cache.read_run(layer, start + off - pos, min(chunk, hi - off))
        pos += n
        if pos >= b:
            break


# ---- kernels ----------------------------------------------------------------------------------------
def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (1,H,T,E) over k, v (1,H,n,E) and its log-sum-exp: (out (1,H,T,E), lse (1,H,T) fp32).
    causal: T == n, query i sees keys <= i. The CPU runs PyTorch's fused flash kernel (which returns the
    LSE); elsewhere a plain fp32 computation of one block."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # (1,H,T,n)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = s.logsumexp(dim=-1)
    return ((s - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def latent_lse(q: torch.Tensor, rows: torch.Tensor, c: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed attention of absorbed queries q (T,H,C+R) over latent rows (n,C+R) and its log-sum-exp:
    (latent output (T,H,C) fp32, lse (T,H) fp32). rows are used in q's dtype."""
    t, h, w = q.shape
    s = (rows.to(q.dtype) @ q.reshape(t * h, w).T).T.float() * scale  # (T*H,n)
    lse = s.logsumexp(dim=-1)
    p = (s - lse[:, None]).exp_()
    o = p.to(q.dtype) @ rows[:, :c].to(q.dtype)  # (T*H,C)
    return o.float().view(t, h, c), lse.view(t, h)


def merge_lse(acc: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor, lse: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's (out, lse) into the running (acc fp32, lse) of the blocks before it."""
    if acc is None:
        return out.float(), lse
    a, a_lse = acc
    new = torch.logaddexp(a_lse, lse)
    return a * (a_lse - new).exp()[..., None] + out.float() * (lse - new).exp()[..., None], new


def _upcaster(upcast: bool, scratch: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows -> rows to compute on: as they are, or fp32 (into `scratch` when given: a fresh 2 MiB tensor
    per chunk costs more in page faults than the conversion itself)."""
    if not upcast:
        return lambda k: k
    if scratch is None:
        return lambda k: k.float()
    return lambda k: scratch[: k.shape[0]].copy_(k)


def latent_decode(q: torch.Tensor, chunks: Iterable[torch.Tensor], c: int, scale: float,
                  upcast: bool, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA attention of one sequence: q (H, C+R) against rows (n, C+R) -> latent output (H, C).

    scores = q · row (the latent *is* the key, shared by every head), values = the first C columns.
    `scratch` (>= n, C+R) fp32, if given, receives each upcast chunk in turn (chunks are used one at a time).
    """
    # scores as (rows @ qᵀ)ᵀ: MKL runs the tall (n, C+R) x (C+R, H) product well; q @ rowsᵀ with only
    # H = 16 rows in q falls on its slower small-M path
    chunks = list(chunks)
    if upcast and chunks and q.device.type == "cpu" and all(k.dtype == torch.bfloat16 for k in chunks):
        lib = native.library()  # fp32 over bf16 rows in C: each row widened once, used by every head for both
        if lib is not None:  # products (1.2-2.1x upcasting into scratch + two GEMMs, AVX2)
            return native.latent_decode_bf16(lib, q, chunks, c, scale)
    prep = _upcaster(upcast, scratch)
    if len(chunks) == 1:  # one fused softmax: no online-softmax passes (~5% of a 32K step)
        k = prep(chunks[0])
        p = (k @ q.to(k.dtype).T).T.float().mul_(scale).softmax(dim=-1)  # (H,S)
        return (p.to(k.dtype) @ k[:, :c]).float()  # (H,C)

    def pieces() -> Iterator[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
        for rows in chunks:
            k = prep(rows)
            s = (k @ q.to(k.dtype).T).T.float().mul_(scale)  # (H,n)
            yield s, lambda p, k=k: p.to(k.dtype) @ k[:, :c]  # (H,C)

    return online_softmax(pieces())


def grouped_decode(q: torch.Tensor, chunks: Iterable[torch.Tensor], n_kv: int, scale: float,
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
