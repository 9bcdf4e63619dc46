"""Runs the model over the paged cache: chunked expanded prefill and batched absorbed decode.

Shapes: B sequences in a decode step, T prompt tokens of a chunk, D hidden, V vocab, H heads,
C kv_lora_rank, R rope dim, Dn/Dv nope/value head dims, Hkv/Dh baseline K/V heads and head dim.

MLA prefill runs layer by layer over the whole prompt ("layer-major"): for each layer, the latent rows
of all prompt tokens are computed chunk by chunk and written to the cache, the keys and values are
decompressed once, and then each chunk of queries attends causally over them and runs its MLP. Every
cached token is decompressed once per layer, so a long prompt costs O(S) decompression, not the O(S²/chunk)
of re-decompressing the prefix at every chunk; peak memory is one layer's K/V plus (S, D) activations.
`prefill_impl="chunked"` instead runs the model's own modules (expanded MLA) through a `SequenceView`,
one chunk of the prompt through all layers at a time (the baselines always do this). Decode runs
the model's norms, projections and MLP/MoE batched over all sequences, and attention per sequence
over its rows in place (`latent_decode`), so no per-head K/V and no padded copy of the cache is made.
`decode_impl="absorbed"` / `"expanded"` instead hand a gathered, padded `BatchView` to the model's own
attention modules (`attend_absorbed` / `attend_expanded`): the references the fast path is tested
against, and `"auto"`'s choice off the CPU (a few kernels per layer for any batch).
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from dsv2.engine.attention import BatchView, SequenceView, decode_chunks, grouped_decode, latent_decode
from dsv2.engine.cache import PagedCache, SeqSlots
from dsv2.model import MLA, DeepseekV2
from dsv2.model.layers import native_low_precision

DECODE_IMPLS = ("auto", "fast", "absorbed", "expanded")
PREFILL_IMPLS = ("layer", "chunked")


def choose_decode_impl(device: torch.device, lengths: list[int]) -> str:
    """decode_impl="auto" for one step. CPU: "fast", per-sequence attention straight over the pool (no
    copy; the CPU runs it as fast as a batch). Elsewhere: "absorbed", one gathered, padded batch through
    the model's modules (a few kernels per layer instead of ~a dozen per sequence per layer, which would
    leave a GPU launch-bound), unless padding would more than double the rows gathered (one long
    sequence among short ones), where the per-sequence path reads less."""
    if device.type == "cpu":
        return "fast"
    return "absorbed" if len(lengths) * max(lengths) <= 2 * sum(lengths) + len(lengths) else "fast"


class ModelRunner:
    """Owns no state of its own beyond derived weights; sequences live in the `PagedCache`."""

    def __init__(self, model: DeepseekV2, cache: PagedCache, prefill_chunk: int = 512,
                 decode_chunk: int | None = None, decode_impl: str = "auto", prefill_impl: str = "layer") -> None:
        if decode_impl not in DECODE_IMPLS:
            raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
        if prefill_impl not in PREFILL_IMPLS:
            raise ValueError(f"prefill_impl must be one of {PREFILL_IMPLS}, got {prefill_impl!r}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.cache, self.cfg = model, cache, model.config
        self.prefill_chunk, self.decode_impl, self.prefill_impl = prefill_chunk, decode_impl, prefill_impl
        w = model.lm_head.weight
        self.device, self.dtype = w.device, w.dtype
        # CPU without native bf16 GEMMs: do the attention math in fp32 over upcast chunks (the model's
        # Linear layers apply the same policy to the projections, and keep one-row GEMVs in bf16).
        self.upcast = not native_low_precision(self.device, self.dtype)
        # rows per upcast chunk (~4 MiB of fp32, L3-resident): big enough that each chunk's two GEMMs split
        # well over the intra-op threads (~10% faster at 32K than 2 MiB chunks), small enough to stay in
        # cache between them. MLA 1820 rows, MHA (4096 wide) 256.
        self.decode_chunk = decode_chunk or (max(256, (1 << 20) // cache.width) if self.upcast else 1 << 30)
        self.mla = self.cfg.attention_type == "mla"
        self._scratch: torch.Tensor | None = None  # one upcast chunk of rows, reused by every decode step

    def scratch(self) -> torch.Tensor | None:
        """(decode_chunk, W) fp32 buffer for upcast chunks (None when rows are used as stored)."""
        if not self.upcast:
            return None
        if self._scratch is None:
            n = min(self.decode_chunk, self.cache.capacity_tokens)
            self._scratch = torch.empty(n, self.cache.width, dtype=torch.float32, device=self.device)
        return self._scratch

    # ---- prefill -----------------------------------------------------------------------------
    def prefill(self, seq: SeqSlots, tokens: list[int]) -> torch.Tensor:
        """Write tokens[seq.length:] into the cache; logits (V,) of the last token."""
        steps = self.prefill_steps(seq, tokens)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, seq: SeqSlots, tokens: list[int]) -> Generator[float, None, torch.Tensor]:
        """`prefill` as a generator: it returns the logits (V,), and pauses between pieces of at least one
        chunk's worth of work (prefill_chunk tokens through every layer), yielding the fraction of the
        prompt's work done so far, in (0, 1). The engine decodes the other requests between the pieces
        of a long prompt; a prompt of at most one chunk runs without a pause. The layer-major path
        pauses only between layers, so one piece of a prompt longer than prefill_chunk x layers tokens
        is a whole layer over all its tokens."""
        if seq.length >= len(tokens):
            raise ValueError(f"prefill needs at least one new token (sequence holds {seq.length} of {len(tokens)})")
        if self.mla and self.prefill_impl == "layer":
            work = self._prefill_layer_major(seq, tokens)
        else:
            work = self._prefill_chunked(seq, tokens)
        hidden = yield from work
        with torch.inference_mode():
            return self.model.lm_head(hidden)[0]  # (V,)

    def _prefill_chunked(self, seq: SeqSlots, tokens: list[int]) -> Generator[float, None, torch.Tensor]:
        """One chunk through all layers at a time, by the model's own modules; final hidden (1, D)."""
        first = seq.length
        while True:
            with torch.inference_mode():
                start = seq.length
                piece = tokens[start: start + self.prefill_chunk]
                ids = torch.tensor([piece], dtype=torch.long, device=self.device)  # (1,T)
                pos = torch.arange(start, start + len(piece), device=self.device)  # (T,)
                view = SequenceView(self.cache, seq, start)
                hidden = self.model.forward_hidden(ids, pos, cache=view, attn_impl="expanded")  # (1,T,D)
                seq.length = start + len(piece)
            if seq.length >= len(tokens):
                return hidden[0, -1:]
            yield (seq.length - first) / (len(tokens) - first)

    def _prefill_layer_major(self, seq: SeqSlots, tokens: list[int]) -> Generator[float, None, torch.Tensor]:
        """All new tokens through one layer at a time (MLA); final hidden (1, D). See the module doc.

        Pauses between layers once at least a chunk's worth of work (prefill_chunk x layers token-layers)
        is done since the last pause; while paused it holds only x (and the rows already cached), no K/V."""
        m, cache, step = self.model, self.cache, self.prefill_chunk
        start, n = seq.length, len(tokens) - seq.length
        budget, done = step * len(m.layers), 0
        with torch.inference_mode():
            ids = torch.tensor([tokens[start:]], dtype=torch.long, device=self.device)  # (1,N)
            pos = torch.arange(start, start + n, device=self.device)  # (N,)
            m.check_input(ids, pos)
            cos, sin = m.rope(pos)  # (N,R/2)
            chunks = [slice(a, min(a + step, n)) for a in range(0, n, step)]
            slots = cache.slots(seq, start, n)  # (N,)
            x = m.embed_tokens(ids)  # (1,N,D)
        for i, layer in enumerate(m.layers):
            if done >= budget:
                done = 0
                yield i / len(m.layers)
            with torch.inference_mode():
                self._layer_major_one(i, layer, x, cos, sin, chunks, seq, slots, start)
            done += n
        seq.length = start + n
        with torch.inference_mode():
            return m.norm(x[0, -1:])  # (1,D)

    def _layer_major_one(self, i: int, layer: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, chunks: list[slice], seq: SeqSlots, slots: torch.Tensor,
                         start: int) -> None:
        """Layer i over all N new tokens, x (1,N,D) updated in place; its latent rows written to the cache."""
        attn: MLA = layer.self_attn
        h = torch.empty_like(x)  # (1,N,D) the normed input, kept for the queries
        rows = []
        for c in chunks:
            h[:, c] = layer.input_layernorm(x[:, c])
            c_kv, k_pe = attn.project_kv(h[:, c], cos[c], sin[c])  # (1,T,C), (1,T,R)
            rows.append(torch.cat((c_kv, k_pe), dim=-1)[0])  # (T,C+R)
        new = torch.cat(rows)  # (N,C+R)
        self.cache.write(i, slots, new)
        # the prompt's own rows at full precision; an earlier prefix as the cache stores it
        every = new if start == 0 else torch.cat((self.cache.read(i, seq, start).to(new.dtype), new))  # (S,C+R)
        k, v = self._expand(attn, every)  # (1,H,S,Dn+R) each
        for c in chunks:
            q_nope, q_pe = attn.project_q(h[:, c], cos[c], sin[c])  # (1,T,H,Dn), (1,T,H,R)
            o = attn.attend_kv(q_nope, q_pe, k[:, :, : start + c.stop], v[:, :, : start + c.stop])  # causal
            xc = x[:, c] + attn.o_proj(o)  # (1,T,D)
            x[:, c] = xc + layer.mlp(layer.post_attention_layernorm(xc))

    def _expand(self, attn: MLA, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompressed K/V (1,H,S,Dn+R) of all rows, built a chunk of keys at a time (bounded transients)."""
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

    # ---- decode ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[SeqSlots], tokens: list[int]) -> torch.Tensor:
        """One new token per sequence at position seq.length; logits (B, V). Advances the lengths."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B,1)
        starts = [s.length for s in seqs]
        pos = torch.tensor(starts, dtype=torch.long, device=self.device)[:, None]  # (B,1)
        impl = self.decode_impl
        if impl == "auto":
            impl = choose_decode_impl(self.device, starts)
        if impl != "fast":
            impl = impl if self.mla else "expanded"
            hidden = self.model.forward_hidden(ids, pos, cache=BatchView(self.cache, seqs, starts),
                                               attn_impl=impl)
        else:
            hidden = self._decode_hidden(ids, pos, seqs, starts)
        for s in seqs:
            s.length += 1
        return self.model.lm_head(hidden[:, -1])  # (B,V)

    def _decode_hidden(self, ids: torch.Tensor, pos: torch.Tensor, seqs: list[SeqSlots],
                       starts: list[int]) -> torch.Tensor:
        m, cache = self.model, self.cache
        self.model.check_input(ids, pos)
        cos, sin = m.rope(pos)  # (B,1,R/2)
        slots = torch.cat([cache.slots(s, st, 1) for s, st in zip(seqs, starts)])  # (B,)
        x = m.embed_tokens(ids)  # (B,1,D)
        for i, layer in enumerate(m.layers):
            h = layer.input_layernorm(x)
            attn = layer.self_attn
            o = self._mla(i, attn, h, cos, sin, seqs, slots) if self.mla else \
                self._gqa(i, attn, h, cos, sin, seqs, slots)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.norm(x)

    def _mla(self, i: int, attn: MLA, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             seqs: list[SeqSlots], slots: torch.Tensor) -> torch.Tensor:
        b = h.shape[0]
        q_nope, q_pe = attn.project_q(h, cos, sin)  # (B,1,H,Dn), (B,1,H,R)
        c_kv, k_pe = attn.project_kv(h, cos, sin)  # (B,1,C), (B,1,R)
        self.cache.write(i, slots, torch.cat((c_kv, k_pe), dim=-1)[:, 0])  # (B,C+R)
        w_uk, w_uv_t = attn.absorbed_weights()  # cached by the module while kv_b_proj is unchanged
        hh, c = w_uk.shape[0], w_uk.shape[2]
        q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1).to(w_uk.dtype), w_uk)  # (H,B,C)
        q_full = torch.cat((q_lat, q_pe[:, 0].transpose(0, 1).to(w_uk.dtype)), dim=-1)  # (H,B,C+R)
        o_lat = torch.empty(hh, b, c, dtype=w_uk.dtype, device=h.device)  # (H,B,C)
        scratch = self.scratch()
        for j, s in enumerate(seqs):
            chunks = decode_chunks(self.cache, i, s, s.length + 1, self.decode_chunk)
            o_lat[:, j] = latent_decode(q_full[:, j], chunks, c, attn.scale, self.upcast, scratch)
        o = torch.bmm(o_lat, w_uv_t)  # (H,B,Dv)
        return o.transpose(0, 1).reshape(b, 1, -1).to(h.dtype)  # (B,1,H*Dv)

    def _gqa(self, i: int, attn: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             seqs: list[SeqSlots], slots: torch.Tensor) -> torch.Tensor:
        from dsv2.model.rope import apply_rope

        b = h.shape[0]
        cs, sn = cos[..., None, :], sin[..., None, :]
        q = apply_rope(attn.q_proj(h).unflatten(-1, (attn.n_heads, attn.d_h)), cs, sn)  # (B,1,H,Dh)
        k = apply_rope(attn.k_proj(h).unflatten(-1, (attn.n_kv, attn.d_h)), cs, sn)  # (B,1,Hkv,Dh)
        v = attn.v_proj(h).unflatten(-1, (attn.n_kv, attn.d_h))  # (B,1,Hkv,Dh)
        self.cache.write(i, slots, torch.cat((k.flatten(2), v.flatten(2)), dim=-1)[:, 0])  # (B,W)
        qd = torch.float32 if self.upcast else q.dtype
        out = torch.empty(b, attn.n_heads, attn.d_h, dtype=qd, device=h.device)  # (B,H,Dh)
        scratch = self.scratch()
        for j, s in enumerate(seqs):
            chunks = decode_chunks(self.cache, i, s, s.length + 1, self.decode_chunk)
            out[j] = grouped_decode(q[j, 0].to(qd), chunks, attn.n_kv, attn.scale, self.upcast, scratch)
        return out.reshape(b, 1, -1).to(h.dtype)  # (B,1,H*Dh)
