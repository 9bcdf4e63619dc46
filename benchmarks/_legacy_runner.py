"""Benchmark-only reference: the engine paths that issue 9 (commit 3cb1f20) replaced, kept so that the
benchmarks can time today's engine against them side by side in one run. Not part of dsv2, not
tested, not to be used for serving; delete it once the comparison is no longer wanted.

Copied from `src/dsv2/engine/runner.py` of commit 9512cfe (the attention kernel `latent_decode` is
today's, which is the old one), with only the calls adapted to today's APIs
(`MLA.absorbed_weights(dtype)`, `dsv2.precision`); the math and the order of operations are the old ones:

- `decode`: the old `ModelRunner.decode` with `decode_impl="fast"` (`_decode_hidden` + `_mla`): norms,
  projections and the MLP batched, absorbed latent attention per sequence straight over its rows in
  the pool (`latent_decode`: fp32 upcast chunks in one reused scratch buffer, online softmax);
- `prefill`: the old layer-major MLA prefill (`_prefill_layer_major` / `_layer_major_one` / `_expand`,
  without the generator pauses): per layer, every prompt token's latent row is computed and cached,
  the whole context's K/V is decompressed once, then each chunk of queries attends causally over it.
  Its peak memory holds one layer's whole decompressed K/V, which grows with the prompt (the reason
  for the change).

Shapes: B sequences, T tokens of a chunk, N prompt tokens, S context, D hidden, H heads, C kv_lora_rank,
R rope dim, W row width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv2.engine.attention import latent_decode
from dsv2.engine.cache import PagedCache
from dsv2.model import MLA, DeepseekV2
from dsv2.precision import native_low_precision, prepare


@dataclass
class SeqSlots:
    """A sequence as the old runner saw it: its block table (borrowed from the engine, `Engine.reserve`) and
    how many of its tokens are in the cache."""

    blocks: list[int]
    length: int = 0


# ---- old engine/attention.py helpers (9512cfe) --------------------------------------------------------
# The per-sequence kernel itself is today's `latent_decode`: since its single-chunk fused-softmax path was
# restored it computes exactly what 9512cfe's did (same ops, same order), so it is imported, not copied.
def _decode_chunks(cache: PagedCache, layer: int, seq: SeqSlots, length: int, chunk: int) -> list[torch.Tensor]:
    out = []
    for start, n in cache.runs(seq.blocks, length):
        for off in range(0, n, chunk):
            out.append(cache.read_run(layer, start + off, min(chunk, n - off)))
    return out


# ---- old engine/runner.py paths (9512cfe) -------------------------------------------------------------
class LegacyRunner:
    """The old MLA decode ("fast") and layer-major prefill over a `PagedCache` (sequences as `SeqSlots`
    whose `length` the caller sets). Applies `dsv2.precision.prepare` to the model (the old
    `model.layers.Linear` carried the same CPU policy built in)."""

    def __init__(self, model: DeepseekV2, cache: PagedCache, prefill_chunk: int = 512,
                 decode_chunk: int | None = None) -> None:
        if model.config.attention_type != "mla":
            raise ValueError("the legacy reference covers MLA only")
        self.model, self.cache, self.prefill_chunk = prepare(model.eval()), cache, prefill_chunk
        w = model.lm_head.weight
        self.device, self.dtype = w.device, w.dtype
        self.upcast = not native_low_precision(self.device, self.dtype)
        self.decode_chunk = decode_chunk or (max(256, (1 << 20) // cache.width) if self.upcast else 1 << 30)
        self._scratch: torch.Tensor | None = None

    def scratch(self) -> torch.Tensor | None:
        if not self.upcast:
            return None
        if self._scratch is None:
            n = min(self.decode_chunk, self.cache.capacity_tokens)
            self._scratch = torch.empty(n, self.cache.width, dtype=torch.float32, device=self.device)
        return self._scratch

    # ---- decode ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[SeqSlots], tokens: list[int]) -> torch.Tensor:
        """One new token per sequence at position seq.length; logits (B, V). Advances the lengths."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B,1)
        starts = [s.length for s in seqs]
        pos = torch.tensor(starts, dtype=torch.long, device=self.device)[:, None]  # (B,1)
        hidden = self._decode_hidden(ids, pos, seqs, starts)
        for s in seqs:
            s.length += 1
        return self.model.lm_head(hidden[:, -1])  # (B,V)

    def _decode_hidden(self, ids: torch.Tensor, pos: torch.Tensor, seqs: list[SeqSlots],
                       starts: list[int]) -> torch.Tensor:
        m, cache = self.model, self.cache
        m.check_input(ids, pos)
        cos, sin = m.rope(pos)  # (B,1,R/2)
        slots = torch.cat([cache.slots(s.blocks, st, 1) for s, st in zip(seqs, starts)])  # (B,)
        x = m.embed_tokens(ids)  # (B,1,D)
        for i, layer in enumerate(m.layers):
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            o = self._mla(i, attn, h, cos, sin, seqs, slots)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.norm(x)

    def _mla(self, i: int, attn: MLA, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             seqs: list[SeqSlots], slots: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        q_nope, q_pe = attn.project_q(h, cos, sin)  # (B,1,H,Dn), (B,1,H,R)
        c_kv, k_pe = attn.project_kv(h, cos, sin)  # (B,1,C), (B,1,R)
        self.cache.write(i, slots, torch.cat((c_kv, k_pe), dim=-1)[:, 0])  # (B,C+R)
        # the old absorbed_weights() returned fp32 copies where bf16 GEMM is not native
        w_uk_t, w_uv = attn.absorbed_weights(torch.float32 if self.upcast else None)
        w_uk, w_uv_t = w_uk_t.transpose(1, 2), w_uv.transpose(1, 2)  # the old (H,Dn,C) / (H,C,Dv) views
        hh, c = w_uk.shape[0], w_uk.shape[2]
        q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1).to(w_uk.dtype), w_uk)  # (H,B,C)
        q_full = torch.cat((q_lat, q_pe[:, 0].transpose(0, 1).to(w_uk.dtype)), dim=-1)  # (H,B,C+R)
        o_lat = torch.empty(hh, b, c, dtype=w_uk.dtype, device=h.device)  # (H,B,C)
        scratch = self.scratch()
        for j, s in enumerate(seqs):
            chunks = _decode_chunks(self.cache, i, s, s.length + 1, self.decode_chunk)
            o_lat[:, j] = latent_decode(q_full[:, j], chunks, c, attn.scale, self.upcast, scratch)
        o = torch.bmm(o_lat, w_uv_t)  # (H,B,Dv)
        return o.transpose(0, 1).reshape(b, 1, -1).to(h.dtype)  # (B,1,H*Dv)

    # ---- layer-major prefill -----------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq: SeqSlots, tokens: list[int]) -> torch.Tensor:
        """Write tokens[seq.length:] into the cache, one layer at a time; logits (V,) of the last token."""
        m, cache, step = self.model, self.cache, self.prefill_chunk
        start, n = seq.length, len(tokens) - seq.length
        ids = torch.tensor([tokens[start:]], dtype=torch.long, device=self.device)  # (1,N)
        pos = torch.arange(start, start + n, device=self.device)  # (N,)
        m.check_input(ids, pos)
        cos, sin = m.rope(pos)  # (N,R/2)
        chunks = [slice(a, min(a + step, n)) for a in range(0, n, step)]
        slots = cache.slots(seq.blocks, start, n)  # (N,)
        x = m.embed_tokens(ids)  # (1,N,D)
        for i, layer in enumerate(m.layers):
            self._layer_major_one(i, layer, x, cos, sin, chunks, seq, slots, start)
        seq.length = start + n
        return m.lm_head(m.norm(x[0, -1:]))[0]  # (V,)

    def _layer_major_one(self, i: int, layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, chunks: list[slice], seq: SeqSlots, slots: torch.Tensor,
                         start: int) -> None:
        attn: MLA = layer.self_attn
        h = torch.empty_like(x)  # (1,N,D) the normed input, kept for the queries
        rows = []
        for c in chunks:
            h[:, c] = layer.input_layernorm(x[:, c])
            c_kv, k_pe = attn.project_kv(h[:, c], cos[c], sin[c])  # (1,T,C), (1,T,R)
            rows.append(torch.cat((c_kv, k_pe), dim=-1)[0])  # (T,C+R)
        new = torch.cat(rows)  # (N,C+R)
        self.cache.write(i, slots, new)
        every = new if start == 0 else torch.cat((self.cache.read(i, seq.blocks, start).to(new.dtype), new))  # (S,C+R)
        k, v = self._expand(attn, every)  # (1,H,S,Dn+R) each
        for c in chunks:
            q_nope, q_pe = attn.project_q(h[:, c], cos[c], sin[c])  # (1,T,H,Dn), (1,T,H,R)
            o = attn.attend_kv(q_nope, q_pe, k[:, :, : start + c.stop], v[:, :, : start + c.stop])  # causal
            xc = x[:, c] + attn.o_proj(o)  # (1,T,D)
            x[:, c] = xc + layer.mlp(layer.post_attention_layernorm(xc))

    def _expand(self, attn: MLA, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = attn.kv_rank
        s, step = rows.shape[0], max(self.prefill_chunk, 2048)
        k = v = None
        for a in range(0, s, step):
            kc, vc = attn.expand_kv(rows[None, a: a + step, :c], rows[None, a: a + step, c:])  # (1,H,n,·)
            if k is None:
                k = kc.new_empty(1, kc.shape[1], s, kc.shape[-1])
                v = vc.new_empty(1, vc.shape[1], s, vc.shape[-1])
            k[:, :, a: a + step] = kc
            v[:, :, a: a + step] = vc
        return k, v
