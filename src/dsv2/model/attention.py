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

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.layers import Linear, RMSNorm, bmm, compute_weight
from dsv2.model.rope import apply_rope

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: the checkpoints use the default eps, not rms_norm_eps


class KVCache(Protocol):
    """What attention needs from a cache: append this layer's new rows, get back all rows + mask."""

    def update(self, layer_idx: int, new: tuple[torch.Tensor, ...]
               ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]: ...


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
    """[a ; b] on the last dim, as a zero-copy view when b already follows a in memory (one cache row)."""
    if (a.dtype == b.dtype and a.stride() == b.stride() and a.shape[:-1] == b.shape[:-1]
            and a.stride(-1) == 1 and b.data_ptr() == a.data_ptr() + a.shape[-1] * a.element_size()):
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
            self.q_proj = Linear(d, h * dq, bias=False, **kw)
        else:
            self.q_a_proj = Linear(d, self.q_rank, bias=cfg.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(self.q_rank, LATENT_NORM_EPS, **kw)
            self.q_b_proj = Linear(self.q_rank, h * dq, bias=False, **kw)
        self.kv_a_proj_with_mqa = Linear(d, self.kv_rank + self.d_rope, bias=cfg.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS, **kw)
        self.kv_b_proj = Linear(self.kv_rank, h * (self.d_nope + self.d_v), bias=False, **kw)
        self.o_proj = Linear(h * self.d_v, d, bias=cfg.attention_bias, **kw)
        self._absorbed: tuple | None = None  # contiguous W_UK / W_UV, rebuilt when kv_b_proj changes

    # ---- projections -------------------------------------------------------------------------
    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope (B,T,H,Dn), q_pe (B,T,H,R) with RoPE applied."""
        q = self.q_proj(x) if self.q_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.n_heads, self.d_nope + self.d_rope))  # (B,T,H,Dn+R)
        q_nope, q_pe = q.split((self.d_nope, self.d_rope), dim=-1)
        return q_nope, apply_rope(q_pe, cos[..., None, :], sin[..., None, :])

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached pair: c_kv (B,T,C) after its RMSNorm, k_pe (B,T,R) after RoPE."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split((self.kv_rank, self.d_rope), dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    @property
    def w_uk(self) -> torch.Tensor:
        """(H, Dn, C): the key up-projection of each head."""
        return self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))[:, : self.d_nope]

    @property
    def w_uv(self) -> torch.Tensor:
        """(H, Dv, C): the value up-projection of each head."""
        return self.kv_b_proj.weight.unflatten(0, (self.n_heads, -1))[:, self.d_nope :]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous (H,Dn,C) W_UK and (H,C,Dv) W_UVᵀ; cached while kv_b_proj is unchanged."""
        w = self.kv_b_proj.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return self.w_uk, self.w_uv.transpose(1, 2)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._absorbed is None or self._absorbed[0] != key:
            wc = compute_weight(w).unflatten(0, (self.n_heads, -1))  # fp32 where bf16 GEMM is not native
            self._absorbed = (key, wc[:, : self.d_nope].contiguous(), wc[:, self.d_nope :].transpose(1, 2).contiguous())
        return self._absorbed[1], self._absorbed[2]

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
        w_uk, w_uv_t = self.absorbed_weights()
        # q_lat = W_UKᵀ q_nope per head: (H, B*T, Dn) @ (H, Dn, C)
        q_lat = bmm(q_nope.permute(2, 0, 1, 3).reshape(h, b * t, self.d_nope), w_uk)  # (H,B*T,C)
        q_lat = q_lat.view(h, b, t, self.kv_rank).permute(1, 0, 2, 3)  # (B,H,T,C)
        q_full = torch.cat((q_lat, q_pe.transpose(1, 2)), dim=-1).reshape(b, h * t, -1)  # (B,H*T,C+R)
        keys = _joined(c_kv, k_pe)  # (B,S,C+R), zero-copy when the cache stores whole rows
        scores = bmm(q_full, keys.transpose(1, 2)).view(b, h, t, s).float() * self.scale  # (B,H,T,S)
        if mask is None and t > 1:
            mask = causal_mask(t, s, q_nope.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype).view(b, h * t, s)
        o_lat = bmm(p, c_kv).view(b, h, t, self.kv_rank)  # (B,H,T,C)
        # W_UV per head: (H, B*T, C) @ (H, C, Dv)
        o = bmm(o_lat.transpose(0, 1).reshape(h, b * t, self.kv_rank), w_uv_t)  # (H,B*T,Dv)
        return o.view(h, b, t, self.d_v).permute(1, 2, 0, 3).reshape(b, t, h * self.d_v)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer_idx: int = 0, attn_impl: str = "expanded") -> torch.Tensor:
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_kv(x, cos, sin)
        mask = None
        if cache is not None:
            (c_kv, k_pe), mask = cache.update(layer_idx, (c_kv, k_pe))
        if attn_impl == "absorbed":
            o = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        elif attn_impl == "expanded":
            o = self.attend_expanded(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            raise ValueError(f"attn_impl must be 'expanded' or 'absorbed', got {attn_impl!r}")
        return self.o_proj(o)


class GQA(nn.Module):
    """Standard attention with Hkv K/V heads of d_h (MHA: Hkv = H, MQA: Hkv = 1), full-head RoPE."""

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.d_h = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.softmax_scale()
        d, kw = cfg.hidden_size, dict(bias=cfg.attention_bias, device=device, dtype=dtype)
        self.q_proj = Linear(d, self.n_heads * self.d_h, **kw)
        self.k_proj = Linear(d, self.n_kv * self.d_h, **kw)
        self.v_proj = Linear(d, self.n_kv * self.d_h, **kw)
        self.o_proj = Linear(self.n_heads * self.d_h, d, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer_idx: int = 0, attn_impl: str = "expanded") -> torch.Tensor:
        b, t, _ = x.shape
        cs, sn = cos[..., None, :], sin[..., None, :]
        q = apply_rope(self.q_proj(x).unflatten(-1, (self.n_heads, self.d_h)), cs, sn)  # (B,T,H,Dh)
        k = apply_rope(self.k_proj(x).unflatten(-1, (self.n_kv, self.d_h)), cs, sn)  # (B,T,Hkv,Dh)
        v = self.v_proj(x).unflatten(-1, (self.n_kv, self.d_h))  # (B,T,Hkv,Dh)
        mask = None
        if cache is not None:
            (k, v), mask = cache.update(layer_idx, (k, v))
        attn_mask, is_causal = _sdpa_mask(mask, t, k.shape[1], x.device)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(o.transpose(1, 2).flatten(2))  # (B,T,D)


def build_attention(cfg: ModelConfig, device: torch.device | None = None,
                    dtype: torch.dtype | None = None) -> nn.Module:
    return (MLA if cfg.attention_type == "mla" else GQA)(cfg, device=device, dtype=dtype)


class DenseCache:
    """Reference cache: contiguous per-layer tensors for one batch of equal-length sequences."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        return next(iter(self.layers.values()))[0].shape[1] if self.layers else 0

    def update(self, layer_idx: int, new: tuple[torch.Tensor, ...]
               ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        old = self.layers.get(layer_idx)
        rows = new if old is None else tuple(torch.cat((o, n), dim=1) for o, n in zip(old, new))
        self.layers[layer_idx] = rows
        return rows, None
