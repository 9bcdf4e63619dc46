"""Multi-head Latent Attention (DeepSeek-V2 §2.1) and the MHA/GQA/MQA baselines of the same dims.

Shapes: B batch, T new tokens, S keys (cached + new), H heads, Hkv baseline K/V heads,
C kv_lora_rank (d_c), Cq q_lora_rank, Dn qk_nope_head_dim, R qk_rope_head_dim (d_R), Dv v_head_dim.

MLA caches only c_kv = RMSNorm(W_DKV h) (C) and the shared, RoPE'd k_R = RoPE(W_KR h) (R) per token.
Two execution paths over the same weights:
  expanded: K/V are decompressed through kv_b_proj, then SDPA (training, prefill);
  absorbed: W_UK is folded into the query, attention runs over the latent like MQA with key width
            C + R and value width C, and W_UV is applied to the attended latent (decode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.layers import RMSNorm
from dsv2.model.rope import apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: the checkpoints use the default eps, not rms_norm_eps


class AttentionBackend(Protocol):
    """Where attention's keys and values come from and which kernel runs: the one seam between the model
    and a cache. The modules compute their projections (RoPE applied) and hand them over; the backend
    stores what it caches and returns the attention output, before o_proj.

    impl is the path the caller asked for ("expanded" | "absorbed"), for backends that offer both
    (`SdpaBackend`, `DenseCache`); a paged engine backend chooses per token (prefill expanded, decode absorbed).
    """

    def mla(self, attn: MLA, layer_idx: int, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
            k_pe: torch.Tensor, impl: str) -> torch.Tensor:
        """q_nope (B,T,H,Dn), q_pe (B,T,H,R), the new tokens' c_kv (B,T,C) and k_pe (B,T,R) -> (B,T,H*Dv)."""
        ...

    def gqa(self, attn: GQA, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            impl: str) -> torch.Tensor:
        """q (B,T,H,Dh), the new tokens' k, v (B,T,Hkv,Dh) -> (B,T,H*Dh)."""
        ...


IMPLS = ("expanded", "absorbed")


def causal_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True = attend: the T queries sit at the end of the S keys."""
    q_pos = torch.arange(s - t, s, device=device)[:, None]
    return torch.arange(s, device=device)[None, :] <= q_pos


def _sdpa_mask(mask: torch.Tensor | None, t: int, s: int, device: torch.device
               ) -> tuple[torch.Tensor | None, bool]:
    """Returns (attn_mask, is_causal) for F.scaled_dot_product_attention."""
    if mask is not None:
        return mask, False
    if t == s:
        return None, True
    return causal_mask(t, s, device), False


def _joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a ; b] on the last dim, as a zero-copy view when b already follows a in memory (one cache row);
    under torch.compile (no data pointers to compare) a cat, which inductor fuses into its consumer."""
    if (not torch.compiler.is_compiling() and a.dtype == b.dtype and a.stride() == b.stride()
            and a.shape[:-1] == b.shape[:-1] and a.stride(-1) == 1
            and b.data_ptr() == a.data_ptr() + a.shape[-1] * a.element_size()):
        return a.as_strided((*a.shape[:-1], a.shape[-1] + b.shape[-1]), a.stride())
    return torch.cat((a, b), dim=-1)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_heads, self.d_nope, self.d_rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.d_v, self.kv_rank, self.q_rank = cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
        self.scale = cfg.softmax_scale()
        h, d, dq = self.n_heads, cfg.hidden_size, self.d_nope + self.d_rope
        kw = dict(device=device, dtype=dtype)
        if self.q_rank is None:
            self.q_proj = nn.Linear(d, h * dq, bias=False, **kw)
        else:
            self.q_a_proj = nn.Linear(d, self.q_rank, bias=cfg.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(self.q_rank, LATENT_NORM_EPS, **kw)
            self.q_b_proj = nn.Linear(self.q_rank, h * dq, bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_rank + self.d_rope, bias=cfg.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS, **kw)
        self.kv_b_proj = nn.Linear(self.kv_rank, h * (self.d_nope + self.d_v), bias=False, **kw)
        self.o_proj = nn.Linear(h * self.d_v, d, bias=cfg.attention_bias, **kw)
        self._absorbed: tuple | None = None  # contiguous W_UK / W_UV, rebuilt when kv_b_proj changes

    # ---- projections -------------------------------------------------------------------------
    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope (B,T,H,Dn), q_pe (B,T,H,R) with RoPE applied."""
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.n_heads, self.d_nope + self.d_rope))  # (B,T,H,Dn+R)
        q_nope, q_pe = q.split((self.d_nope, self.d_rope), dim=-1)
        return q_nope, self.rope(q_pe, cos[..., None, :], sin[..., None, :])

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached pair: c_kv (B,T,C) after its RMSNorm, k_pe (B,T,R) after RoPE."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split((self.kv_rank, self.d_rope), dim=-1)
        return self.kv_a_layernorm(c_kv), self.rope(k_pe, cos, sin)

    @property
    def w_uk(self) -> torch.Tensor:
        """(H, Dn, C): the key up-projection of each head."""
        return self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))[:, : self.d_nope]

    @property
    def w_uv(self) -> torch.Tensor:
        """(H, Dv, C): the value up-projection of each head."""
        return self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))[:, self.d_nope :]

    def absorbed_weights(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UKᵀ (H,C,Dn) contiguous and W_UV (H,Dv,C) in `dtype` (default: the weight's), both with
        contiguous rows for `bmm_nt`. W_UV is a view of kv_b_proj's weight when no cast is asked for; the
        W_UKᵀ copy (and a cast W_UV) is cached while kv_b_proj is unchanged (the cache follows in-place
        updates: the weight's version counter). Views of the weight, not cached, with autograd on or under
        torch.compile (which traces no cache)."""
        w = self.kv_b_proj.weight
        dtype = dtype or w.dtype
        if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return self.w_uk.transpose(1, 2).to(dtype), self.w_uv.to(dtype)
        key = (w.data_ptr(), w._version, dtype, w.device)
        if self._absorbed is None or self._absorbed[0] != key:
            wc = w.detach().to(dtype).unflatten(0, (self.n_heads, -1))  # (H,Dn+Dv,C), a view when no cast
            self._absorbed = (key, wc[:, : self.d_nope].transpose(1, 2).contiguous(), wc[:, self.d_nope :])
        return self._absorbed[1], self._absorbed[2]

    # RoPE of the decoupled parts (`apply_rope`): a class attribute, like `bmm_nt` below, so that a precision
    # pass can swap in a kernel that does the same in one call (`dsv2.precision.CpuMLA`)
    rope = staticmethod(apply_rope)

    # a @ bᵀ for each head: (H,M,K) x (H,N,K) -> (H,M,N), the absorbed path's per-head products. A class
    # attribute, so that a precision pass can swap in another kernel (`dsv2.precision.CpuMLA`).
    bmm_nt = staticmethod(lambda a, b: torch.bmm(a, b.transpose(1, 2)))

    def absorbed_operand_dtype(self, dtype: torch.dtype, rows: int) -> torch.dtype:
        """The dtype of the absorbed weights that multiply `rows` rows of activations computed in `dtype`:
        `dtype` itself here; a precision pass whose `bmm_nt` takes mixed operands may keep them as stored."""
        return dtype

    def absorb_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor, dtype: torch.dtype | None = None
                     ) -> torch.Tensor:
        """[W_UKᵀ q_nope ; q_pe] per head: q_nope (…,H,Dn), q_pe (…,H,R) -> (…,H,C+R), a query that scores
        the latent rows [c_kv ; k_R] directly (q_C·k_C = (W_UKᵀ q_C)·c_kv)."""
        lead, h = q_nope.shape[:-2], self.n_heads
        dt = dtype or self.kv_b_proj.weight.dtype
        w_uk_t, _ = self.absorbed_weights(self.absorbed_operand_dtype(dt, q_nope.numel() // (h * self.d_nope)))
        qn = q_nope.reshape(-1, h, self.d_nope).transpose(0, 1).to(dt)  # (H,M,Dn)
        q_lat = self.bmm_nt(qn, w_uk_t).to(dt).transpose(0, 1)  # (M,H,C)
        return torch.cat((q_lat, q_pe.reshape(-1, h, self.d_rope).to(dt)), dim=-1).view(*lead, h, -1)

    def absorbed_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """W_UV per head on the attended latent: o_lat (…,H,C) -> (…,H*Dv), in o_lat's dtype."""
        lead, h = o_lat.shape[:-2], self.n_heads
        _, w_uv = self.absorbed_weights(self.absorbed_operand_dtype(o_lat.dtype, o_lat.numel() // (h * self.kv_rank)))
        o = self.bmm_nt(o_lat.reshape(-1, h, self.kv_rank).transpose(0, 1), w_uv).to(o_lat.dtype)  # (H,M,Dv)
        return o.transpose(0, 1).reshape(*lead, h * self.d_v)

    # ---- attention ---------------------------------------------------------------------------
    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompress S cached keys: k (B,H,S,Dn+R), v (B,H,S,Dn+R) (v zero-padded to k's width)."""
        b, s, _ = c_kv.shape
        h = self.n_heads
        kv = self.kv_b_proj(c_kv).unflatten(-1, (h, self.d_nope + self.d_v))  # (B,S,H,Dn+Dv)
        k_nope, v = kv.split((self.d_nope, self.d_v), dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(b, s, h, self.d_rope)), dim=-1)  # (B,S,H,Dn+R)
        pad = self.d_nope + self.d_rope - self.d_v
        if pad > 0:  # PyTorch's fused CPU SDPA needs equal q/k and v widths; its fallback is ~3x slower
            v = F.pad(v, (0, pad))  # (B,S,H,Dn+R)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend_kv(self, q_nope: torch.Tensor, q_pe: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """SDPA of the T queries over decompressed k, v (B,H,S,·) from `expand_kv`. Returns (B,T,H*Dv)."""
        t, s = q_nope.shape[1], k.shape[2]
        q = torch.cat((q_nope, q_pe), dim=-1)  # (B,T,H,Dn+R)
        attn_mask, is_causal = _sdpa_mask(mask, t, s, q.device)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           scale=self.scale)  # (B,H,T,Dn+R)
        return o.transpose(1, 2)[..., : self.d_v].flatten(2)  # (B,T,H*Dv)

    def attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                        k_pe: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decompress K/V for all S keys and run SDPA. Returns (B,T,H*Dv)."""
        return self.attend_kv(q_nope, q_pe, *self.expand_kv(c_kv, k_pe), mask)

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
                        k_pe: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the latent directly: nothing per head is built for the S keys. Returns (B,T,H*Dv)."""
        b, t, h, _ = q_nope.shape
        s = c_kv.shape[1]
        q = self.absorb_query(q_nope, q_pe).reshape(b, t * h, -1)  # (B,T*H,C+R)
        keys = _joined(c_kv, k_pe)  # (B,S,C+R), zero-copy when the cache stores whole rows
        scores = torch.bmm(q, keys.to(q.dtype).transpose(1, 2)).view(b, t, h, s).float() * self.scale  # (B,T,H,S)
        if mask is None and t > 1:
            mask = causal_mask(t, s, q_nope.device)
        if mask is not None:  # (T,S) or (B,1,T,S)
            scores = scores.masked_fill(~(mask.transpose(1, 2) if mask.dim() == 4 else mask[:, None]), float("-inf"))
        p = scores.softmax(dim=-1).to(q.dtype).view(b, t * h, s)
        o_lat = torch.bmm(p, c_kv.to(q.dtype)).view(b, t, h, self.kv_rank)  # (B,T,H,C)
        return self.absorbed_output(o_lat).to(q_nope.dtype)

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               mask: torch.Tensor | None, impl: str) -> torch.Tensor:
        """Attention of the T queries over S latent rows by `impl` ("expanded" | "absorbed"). (B,T,H*Dv)."""
        if impl == "absorbed":
            return self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        if impl == "expanded":
            return self.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask)
        raise ValueError(f"attn_impl must be one of {IMPLS}, got {impl!r}")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend,
                layer_idx: int = 0, impl: str = "expanded") -> torch.Tensor:
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_kv(x, cos, sin)
        return self.o_proj(backend.mla(self, layer_idx, q_nope, q_pe, c_kv, k_pe, impl))


class GQA(nn.Module):
    """Standard attention with Hkv K/V heads of d_h (MHA: Hkv = H, MQA: Hkv = 1), full-head RoPE."""

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.d_h = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.softmax_scale()
        d, kw = cfg.hidden_size, dict(bias=cfg.attention_bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(d, self.n_heads * self.d_h, **kw)
        self.k_proj = nn.Linear(d, self.n_kv * self.d_h, **kw)
        self.v_proj = nn.Linear(d, self.n_kv * self.d_h, **kw)
        self.o_proj = nn.Linear(self.n_heads * self.d_h, d, **kw)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B,T,H,Dh) and k (B,T,Hkv,Dh) with RoPE applied, v (B,T,Hkv,Dh)."""
        cs, sn = cos[..., None, :], sin[..., None, :]
        q = apply_rope(self.q_proj(x).unflatten(-1, (self.n_heads, self.d_h)), cs, sn)  # (B,T,H,Dh)
        k = apply_rope(self.k_proj(x).unflatten(-1, (self.n_kv, self.d_h)), cs, sn)  # (B,T,Hkv,Dh)
        return q, k, self.v_proj(x).unflatten(-1, (self.n_kv, self.d_h))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """SDPA of q (B,T,H,Dh) over k, v (B,S,Hkv,Dh), queries last (or by mask). Returns (B,T,H*Dh)."""
        attn_mask, is_causal = _sdpa_mask(mask, q.shape[1], k.shape[1], q.device)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                           enable_gqa=self.n_kv != self.n_heads)  # (B,H,T,Dh)
        return o.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend,
                layer_idx: int = 0, impl: str = "expanded") -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(backend.gqa(self, layer_idx, q, k, v, impl))  # (B,T,D)


def build_attention(cfg: ModelConfig, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    return (MLA if cfg.attention_type == "mla" else GQA)(cfg, device=device, dtype=dtype)


class SdpaBackend:
    """No cache: the T tokens attend causally to each other (training, `model(ids)`)."""

    def mla(self, attn: MLA, layer_idx: int, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
            k_pe: torch.Tensor, impl: str) -> torch.Tensor:
        return attn.attend(q_nope, q_pe, c_kv, k_pe, None, impl)

    def gqa(self, attn: GQA, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            impl: str) -> torch.Tensor:
        return attn.attend(q, k, v)


class DenseCache:
    """Reference cache: contiguous per-layer rows for one batch of equal-length sequences.

    Rows are what the engine caches per token: [c_kv ; k_R] (MLA) or [k ; v] (baselines). `store`, if
    given, maps new rows to what the cache keeps (e.g. a quantise-dequantise round trip): every query,
    new tokens included, attends to the rows as kept, which is what a paged engine cache does.
    """

    def __init__(self, store: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.layers: dict[int, torch.Tensor] = {}  # layer -> rows (B,S,W)
        self.store = store

    def __len__(self) -> int:
        return next(iter(self.layers.values())).shape[1] if self.layers else 0

    def append(self, layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
        """Keep rows (B,T,W) of one layer after the ones held; returns all rows (B,S,W) as kept."""
        new = rows if self.store is None else self.store(rows)
        old = self.layers.get(layer_idx)
        every = new if old is None else torch.cat((old, new.to(old.dtype)), dim=1)
        self.layers[layer_idx] = every
        return every

    def mla(self, attn: MLA, layer_idx: int, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
            k_pe: torch.Tensor, impl: str) -> torch.Tensor:
        rows = self.append(layer_idx, torch.cat((c_kv, k_pe), dim=-1)).to(c_kv.dtype)  # (B,S,C+R)
        return attn.attend(q_nope, q_pe, rows[..., : attn.kv_rank], rows[..., attn.kv_rank:], None, impl)

    def gqa(self, attn: GQA, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            impl: str) -> torch.Tensor:
        rows = self.append(layer_idx, torch.cat((k.flatten(2), v.flatten(2)), dim=-1)).to(k.dtype)  # (B,S,W)
        kk, vv = rows.chunk(2, dim=-1)
        shape = (attn.n_kv, attn.d_h)
        return attn.attend(q, kk.unflatten(-1, shape), vv.unflatten(-1, shape))
