"""`PagedBackend`: the model's attention seam (dsv2.model.AttentionBackend) over the engine's paged cache.

Shapes: N tokens of the step (flattened, batch dim 1), T new tokens of one sequence, Bd decoding
sequences, H heads, E = Dn + R expanded key width, C latent width, W row width.

The model's modules compute projections as always and hand (q, new rows) to `mla` / `gqa`; this class
writes the rows to the cache at the step's slot mapping and runs the kernels of dsv2.engine.attention
per sequence (see that module's docstring for the policy). It holds no state across steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv2.engine.attention import (
    SeqSpan,
    StepMetadata,
    choose_decode_impl,
    grouped_decode,
    latent_decode,
    latent_lse,
    merge_lse,
    sdpa_lse,
    seq_rows,
)
from dsv2.engine.cache import PagedCache
from dsv2.model import GQA, MLA


def gathered_mla_decode(cache: PagedCache, attn: MLA, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor,
                        index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Absorbed attention of one token per sequence, q (Bd,H,·), over its rows gathered into one padded
    batch: slots index (Bd,S), valid (Bd,S) (padding False) -> (Bd,H*Dv). A few kernels for any batch,
    and only tensors (no per-sequence Python): what a GPU and a compiled step want."""
    c = attn.kv_rank
    rows = cache.gather(layer, index).masked_fill_(~valid[..., None], 0).to(q_nope.dtype)  # (Bd,S,C+R)
    mask = valid[:, None, None, :]  # (Bd,1,1,S)
    return attn.attend_absorbed(q_nope[:, None], q_pe[:, None], rows[..., :c], rows[..., c:], mask)[:, 0]


def gathered_gqa_decode(cache: PagedCache, attn: GQA, layer: int, q: torch.Tensor, index: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
    """Baseline attention of one token per sequence, q (Bd,H,Dh), over its rows [k ; v] gathered into one
    padded batch (see `gathered_mla_decode`) -> (Bd,H*Dh)."""
    rows = cache.gather(layer, index).masked_fill_(~valid[..., None], 0).to(q.dtype)  # (Bd,S,W)
    k, v = (t.unflatten(-1, (attn.n_kv, attn.d_h)) for t in rows.chunk(2, dim=-1))  # (Bd,S,Hkv,Dh)
    return attn.attend(q[:, None], k, v, valid[:, None, None, :])[:, 0]


class PagedBackend:
    """One step's attention over the paged cache. `upcast`: compute decode attention in fp32 (CPU
    without native low-precision GEMMs); `scratch`: a reused (decode_chunk, W) fp32 buffer for that."""

    def __init__(self, cache: PagedCache, meta: StepMetadata, decode_impl: str = "auto", upcast: bool = False,
                 decode_chunk: int = 1 << 30, key_block: int = 2048, scratch: torch.Tensor | None = None) -> None:
        self.cache, self.meta, self.upcast, self.scratch = cache, meta, upcast, scratch
        self.decode_chunk, self.key_block = decode_chunk, key_block
        lengths = [meta.spans[i].ctx + 1 for i in meta.decode]
        device = cache.pools[0][0].device
        self.decode_impl = decode_impl if decode_impl != "auto" else choose_decode_impl(device, lengths)

    def _write(self, layer: int, rows: torch.Tensor) -> None:
        if rows.shape[0] != self.meta.num_tokens:
            raise ValueError(f"the paged backend expects the step's {self.meta.num_tokens} tokens flattened "
                             f"as batch 1, got {rows.shape[0]} rows")
        self.cache.write(layer, self.meta.slot_mapping, rows)

    # ---- MLA ---------------------------------------------------------------------------------------
    def mla(self, attn: MLA, layer_idx: int, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
            k_pe: torch.Tensor, impl: str) -> torch.Tensor:
        self._write(layer_idx, torch.cat((c_kv, k_pe), dim=-1).flatten(0, 1))  # (N,C+R)
        qn, qp = q_nope[0], q_pe[0]  # (N,H,Dn), (N,H,R)
        if not self.meta.prefill:  # every token decodes, in order: no gather / scatter
            return self._mla_decode(attn, layer_idx, qn, qp)[None]
        out = qn.new_empty(qn.shape[0], attn.n_heads * attn.d_v)  # (N,H*Dv)
        if self.meta.decode:
            idx = self.meta.decode_tokens
            out[idx] = self._mla_decode(attn, layer_idx, qn[idx], qp[idx])
        for i in self.meta.prefill:
            s = self.meta.spans[i]
            q = slice(s.q_start, s.q_start + s.q_len)
            out[q] = self._mla_prefill(attn, layer_idx, s, qn[q], qp[q])
        return out[None]

    def _mla_decode(self, attn: MLA, layer: int, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """Absorbed attention of one token per sequence: q (Bd,H,·) -> (Bd,H*Dv)."""
        c, dtype = attn.kv_rank, q_nope.dtype
        if self.decode_impl == "gathered":
            return gathered_mla_decode(self.cache, attn, layer, q_nope, q_pe, *self.meta.gather_plan(q_nope.device))
        q = attn.absorb_query(q_nope, q_pe, torch.float32 if self.upcast else dtype)  # (Bd,H,C+R)
        o_lat = q.new_empty(q.shape[0], attn.n_heads, c)  # (Bd,H,C)
        for j, i in enumerate(self.meta.decode):
            s = self.meta.spans[i]
            rows = seq_rows(self.cache, layer, s, 0, s.ctx + 1, self.decode_chunk)
            o_lat[j] = latent_decode(q[j], rows, c, attn.scale, self.upcast, self.scratch)
        return attn.absorbed_output(o_lat).to(dtype)

    def _mla_prefill(self, attn: MLA, layer: int, s: SeqSpan, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """Attention of one sequence's T new tokens, key block by key block, merged by log-sum-exp -> (T,H*Dv).

        The new tokens' own block is always expanded (causal). The cached prefix is expanded too, unless
        T is so small that decompressing every prefix key (2·C·H·(Dn+Dv) FLOPs a key) costs more than
        scoring the latent rows directly (absorbed: ~2·H·(2C - Dn - Dv) more FLOPs a query-key pair than
        expanded): below T* = C·(Dn+Dv) / (2C - Dn - Dv) (170 on V2) the prefix is attended absorbed,
        e.g. a short question after a cached system prompt, or a small chunk of a long prompt."""
        c = attn.kv_rank
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)[None]  # (1,H,T,E)
        acc = None
        ranges = self._key_ranges(s)
        denom = 2 * c - attn.d_nope - attn.d_v
        if s.ctx and denom > 0 and s.q_len * denom < c * (attn.d_nope + attn.d_v):
            acc = self._absorbed_prefix(attn, layer, s, q_nope, q_pe, ranges[:-1])
            ranges = ranges[-1:]
        acc = self._expanded(layer, s, q, ranges, lambda r: attn.expand_kv(r[None, :, :c], r[None, :, c:]),
                             attn.scale, attn.d_v, acc)  # V is padded to E: keep the first Dv
        return acc[0][0].to(q.dtype).transpose(0, 1).flatten(1)  # (H,T,Dv) -> (T,H*Dv)

    def _absorbed_prefix(self, attn: MLA, layer: int, s: SeqSpan, q_nope: torch.Tensor, q_pe: torch.Tensor,
                         ranges: list[tuple[int, int, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached prefix attended absorbed: (out (1,H,T,Dv) fp32 after W_UV, lse (1,H,T)), ready to
        merge with expanded blocks (W_UV is linear, so it commutes with the log-sum-exp merge)."""
        cdt = torch.float32 if self.upcast else q_nope.dtype
        qa = attn.absorb_query(q_nope, q_pe, cdt)  # (T,H,C+R)
        acc = None
        for a, b, _ in ranges:
            o, lse = latent_lse(qa, self._rows(layer, s, a, b), attn.kv_rank, attn.scale)  # (T,H,C), (T,H)
            acc = merge_lse(acc, o, lse)
        o = attn.absorbed_output(acc[0].to(cdt)).view(s.q_len, attn.n_heads, attn.d_v)  # (T,H,Dv)
        return o.float().transpose(0, 1)[None], acc[1].transpose(0, 1)[None]

    def _expanded(self, layer: int, s: SeqSpan, q: torch.Tensor, ranges: list[tuple[int, int, bool]],
                  to_kv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], scale: float, d_out: int,
                  acc: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q (1,H,T,E) attended over each key range's rows turned into k, v (1,H,n,E) by `to_kv`, merged
        by log-sum-exp into `acc`: (out (1,H,T,d_out) fp32, lse (1,H,T))."""
        for a, b, causal in ranges:
            k, v = to_kv(self._rows(layer, s, a, b).to(q.dtype))
            o, lse = sdpa_lse(q, k, v, scale, causal)
            acc = merge_lse(acc, o[..., :d_out], lse)
        return acc

    def _rows(self, layer: int, s: SeqSpan, a: int, b: int) -> torch.Tensor:
        """Rows (b-a, W) of tokens [a, b) of a sequence as one tensor (a copy only across block runs)."""
        pieces = list(seq_rows(self.cache, layer, s, a, b, b - a))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _key_ranges(self, s: SeqSpan) -> list[tuple[int, int, bool]]:
        """Key blocks of a prefill: the cached prefix in blocks of key_block (no mask), then the new
        tokens themselves (causal, a square block)."""
        out = [(a, min(a + self.key_block, s.ctx), False) for a in range(0, s.ctx, self.key_block)]
        return out + [(s.ctx, s.ctx + s.q_len, True)]

    # ---- MHA / GQA / MQA baselines -------------------------------------------------------------------
    def gqa(self, attn: GQA, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            impl: str) -> torch.Tensor:
        self._write(layer_idx, torch.cat((k.flatten(2), v.flatten(2)), dim=-1).flatten(0, 1))  # (N,W)
        q0 = q[0]  # (N,H,Dh)
        out = q0.new_empty(q0.shape[0], attn.n_heads * attn.d_h)
        for i in self.meta.decode:  # baselines: always per sequence, in place
            s = self.meta.spans[i]
            rows = seq_rows(self.cache, layer_idx, s, 0, s.ctx + 1, self.decode_chunk)
            o = grouped_decode(q0[s.q_start], rows, attn.n_kv, attn.scale, self.upcast, self.scratch)
            out[s.q_start] = o.flatten().to(out.dtype)
        for i in self.meta.prefill:
            s = self.meta.spans[i]
            sl = slice(s.q_start, s.q_start + s.q_len)
            qq = q0[sl].transpose(0, 1)[None]  # (1,H,T,Dh)
            acc = self._expanded(layer_idx, s, qq, self._key_ranges(s), lambda r: self._heads(attn, r),
                                 attn.scale, attn.d_h)
            out[sl] = acc[0][0].to(out.dtype).transpose(0, 1).flatten(1)
        return out[None]

    @staticmethod
    def _heads(attn: GQA, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Baseline rows (n, 2·Hkv·Dh) -> k, v (1,H,n,Dh), each K/V head repeated for its G query heads."""
        return tuple(t.unflatten(-1, (attn.n_kv, attn.d_h)).transpose(0, 1)[None]
                     .repeat_interleave(attn.n_heads // attn.n_kv, dim=1) for t in rows.chunk(2, dim=-1))
