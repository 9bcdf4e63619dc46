"""Independent references for the model tests: float64 MLA / baseline attention from the paper's
formulas, a per-token router, the small configs the parity tests sweep, and transformers glue.

No formula here calls into dsv2.model: each is written out again from the paper (arXiv:2405.04434) so a
mistake shared with the code under test cannot make a test pass.
Shapes: B batch, T tokens, H heads, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dsv2 import ModelConfig

# ---- configs swept by the parity and expanded-vs-absorbed tests ---------------------------------
# All start from the `tiny` preset (q compression, 8 experts in 4 groups, yarn s=4 on 64 positions).
_AMP_YARN = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 32, "beta_fast": 32,
             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5}  # cos/sin amplitude != 1
_GREEDY = dict(topk_method="greedy", n_group=1, topk_group=1)

CASES: dict[str, dict[str, Any]] = {
    # q_lora set, group_limited_greedy, yarn, first_k_dense_replace 1, factor 1
    "qlora-glg-yarn-fk1": dict(),
    # q_lora null, greedy, no yarn, every layer MoE
    "noq-greedy-plain-fk0": dict(q_lora_rank=None, rope_scaling=None, first_k_dense_replace=0, **_GREEDY),
    # two dense layers first, routed_scaling_factor 16 as in V2
    "qlora-greedy-yarn-fk2-rsf16": dict(first_k_dense_replace=2, routed_scaling_factor=16.0, **_GREEDY),
    # q_lora null, group-limited with 1 of 2 groups kept, top-3, factor 2.5, yarn amplitude != 1, and
    # rms_norm_eps far from the 1e-6 the latent norms (q_a/kv_a_layernorm) always use
    "noq-glg-yarnamp-rsf2.5": dict(q_lora_rank=None, n_group=2, topk_group=1, num_experts_per_tok=3,
                                   routed_scaling_factor=2.5, rope_scaling=_AMP_YARN, rms_norm_eps=1e-2),
    # attention_bias on (q_a_proj, kv_a_proj_with_mqa, o_proj carry biases)
    "qlora-bias-greedy-fk1": dict(attention_bias=True, rms_norm_eps=1e-2, **_GREEDY),
}
# Cases where transformers 5.24 departs from DeepSeek's reference semantics (see test_parity.py).
REFERENCE_ONLY_CASES: dict[str, dict[str, Any]] = {
    "norm-topk-glg": dict(norm_topk_prob=True, routed_scaling_factor=2.0),
    "norm-topk-greedy-noq": dict(norm_topk_prob=True, q_lora_rank=None, num_experts_per_tok=3, **_GREEDY),
    "moe-freq-2": dict(moe_layer_freq=2, num_hidden_layers=4, first_k_dense_replace=1),
}
ALL_CASES = {**CASES, **REFERENCE_ONLY_CASES}
SEQ_LEN = 96  # longer than original_max_position_embeddings (64, or 32 with _AMP_YARN)


def case_config(name: str) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **ALL_CASES[name])


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, router_std: float = 1.0, std: float = 0.05) -> None:
    """Weights large enough that logits are O(1), norm weights != 1 (so a skipped norm shows), and a
    router 50x the 0.02 init so the top-k is decided clearly (at 0.02 near-ties are common)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        elif name.endswith("mlp.gate.weight"):
            p.copy_(router_std * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        else:
            p.copy_(std * torch.randn(p.shape, generator=gen, dtype=torch.float64))


# ---- transformers glue ---------------------------------------------------------------------------
_DSV2_ONLY = ("model_type", "architectures", "attention_type", "baseline_head_dim",
              "device_aux_loss_alpha", "comm_aux_loss_alpha", "rope_scaling", "rope_theta", "head_dim")


def hf_config(cfg: ModelConfig):
    """The transformers DeepseekV2Config of the same model, built from its own (rope_parameters) form."""
    from transformers import DeepseekV2Config

    d = {k: v for k, v in cfg.to_dict().items() if k not in _DSV2_ONLY}
    rp: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rp.update({k: v for k, v in cfg.rope_scaling.items() if k != "type"}, rope_type="yarn")
    return DeepseekV2Config(**d, rope_parameters=rp)


def logits_close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- RoPE / YaRN from the formulas ---------------------------------------------------------------
def mscale(s: float, m: float) -> float:
    return 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0


def ref_inv_freq(dim: int, base: float, rs: dict | None) -> torch.Tensor:
    """(dim/2,) float64: base^(-2i/dim), blended with base^(-2i/dim)/s by a linear ramp between the
    YaRN correction dims (beta_fast full turns -> extrapolate, beta_slow -> interpolate)."""
    freqs = torch.tensor([base ** (-2.0 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    if rs is None:
        return freqs
    s, orig = float(rs["factor"]), rs["original_max_position_embeddings"]

    def turns_dim(rotations: float) -> float:  # wavelength 2π/θ_i fits `rotations` times in orig
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(turns_dim(rs.get("beta_fast", 32))), 0)
    high = min(math.ceil(turns_dim(rs.get("beta_slow", 1))), dim - 1)
    if high == low:
        high += 0.001
    out = torch.empty_like(freqs)
    for i in range(dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        out[i] = freqs[i] * (1 - ramp) + freqs[i] / s * ramp
    return out


def ref_amplitude(rs: dict | None) -> float:
    if rs is None:
        return 1.0
    return mscale(rs["factor"], rs.get("mscale", 1.0)) / mscale(rs["factor"], rs.get("mscale_all_dim", 0.0))


def ref_scale(d_qk: int, rs: dict | None) -> float:
    m = mscale(rs["factor"], rs["mscale_all_dim"]) if rs is not None and rs.get("mscale_all_dim") else 1.0
    return d_qk**-0.5 * m * m


def ref_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, amp: float) -> torch.Tensor:
    """x (..., T, [H,] R) float64, interleaved pairs (2i, 2i+1) rotated by pos·θ_i, times amp."""
    ang = pos.double()[:, None] * inv_freq[None, :]  # (T, R/2)
    if x.dim() == 4:  # (B,T,H,R)
        ang = ang[:, None, :]
    cos, sin = ang.cos() * amp, ang.sin() * amp
    out = torch.empty_like(x)
    even, odd = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def ref_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _causal_softmax_attend(scores: torch.Tensor, values: torch.Tensor, offset: int) -> torch.Tensor:
    """scores (T,S), values (S,Dv); query t sits at key position offset + t."""
    t, s = scores.shape
    allowed = torch.arange(s)[None, :] <= (offset + torch.arange(t))[:, None]
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return p @ values


@torch.no_grad()
def ref_mla(attn: torch.nn.Module, cfg: ModelConfig, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """MLA (DeepSeek-V2 §2.1, App. C) in float64, one head at a time. x (B,T,D), pos (T,) -> (B,T,D)."""
    w = {k: v.double() for k, v in attn.state_dict().items()}
    x = x.double()
    h, dn, r, dv, c = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                       cfg.v_head_dim, cfg.kv_lora_rank)
    inv, amp = ref_inv_freq(r, cfg.rope_theta, cfg.rope_scaling), ref_amplitude(cfg.rope_scaling)
    scale = ref_scale(dn + r, cfg.rope_scaling)
    if cfg.q_lora_rank is None:
        q = x @ w["q_proj.weight"].T
    else:  # c_q = RMSNorm(W_DQ h), q = W_UQ c_q (W_QR rows interleaved per head in q_b_proj)
        q = ref_rms(x @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"], 1e-6) @ w["q_b_proj.weight"].T
    q = q.view(*x.shape[:2], h, dn + r)
    q_c, q_r = q[..., :dn], ref_rope(q[..., dn:], pos, inv, amp)
    kv_a = x @ w["kv_a_proj_with_mqa.weight"].T  # [W_DKV ; W_KR] h
    c_kv = ref_rms(kv_a[..., :c], w["kv_a_layernorm.weight"], 1e-6)  # (B,T,C)
    k_r = ref_rope(kv_a[..., c:], pos, inv, amp)  # (B,T,R) ONE rope key shared by all heads, from h
    w_kvb = w["kv_b_proj.weight"].view(h, dn + dv, c)
    out = torch.zeros(*x.shape[:2], h * dv, dtype=torch.float64)
    for b in range(x.shape[0]):
        for i in range(h):
            k_c = c_kv[b] @ w_kvb[i, :dn].T  # (T,Dn) = W_UK,i c_kv
            v = c_kv[b] @ w_kvb[i, dn:].T  # (T,Dv) = W_UV,i c_kv
            scores = (q_c[b, :, i] @ k_c.T + q_r[b, :, i] @ k_r[b].T) * scale
            out[b, :, i * dv : (i + 1) * dv] = _causal_softmax_attend(scores, v, 0)
    return out @ w["o_proj.weight"].T


@torch.no_grad()
def ref_baseline(attn: torch.nn.Module, cfg: ModelConfig, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """MHA/GQA/MQA in float64: full-head interleaved RoPE on q and k, head i reads K/V head i // (H/Hkv)."""
    w = {k: v.double() for k, v in attn.state_dict().items()}
    x = x.double()
    h, dh = cfg.num_attention_heads, cfg.head_dim
    hkv = {"mha": h, "mqa": 1}.get(cfg.attention_type, cfg.num_key_value_heads)
    inv, amp = ref_inv_freq(dh, cfg.rope_theta, cfg.rope_scaling), ref_amplitude(cfg.rope_scaling)
    scale = ref_scale(dh, cfg.rope_scaling)
    q = ref_rope((x @ w["q_proj.weight"].T).view(*x.shape[:2], h, dh), pos, inv, amp)
    k = ref_rope((x @ w["k_proj.weight"].T).view(*x.shape[:2], hkv, dh), pos, inv, amp)
    v = (x @ w["v_proj.weight"].T).view(*x.shape[:2], hkv, dh)
    out = torch.zeros(*x.shape[:2], h * dh, dtype=torch.float64)
    for b in range(x.shape[0]):
        for i in range(h):
            j = i // (h // hkv)
            scores = q[b, :, i] @ k[b, :, j].T * scale
            out[b, :, i * dh : (i + 1) * dh] = _causal_softmax_attend(scores, v[b, :, j], 0)
    return out @ w["o_proj.weight"].T


# ---- routing, one token at a time ----------------------------------------------------------------
def ref_route_token(logits: list[float], k: int, method: str, n_group: int, topk_group: int,
                    norm: bool, rsf: float) -> tuple[list[int], list[float]]:
    """DeepSeek's gate for one token. Ties go to the lower index (experts and groups)."""
    m = max(logits)
    ex = [math.exp(v - m) for v in logits]
    s = [v / sum(ex) for v in ex]
    e = len(s)
    allowed = list(range(e))
    if method == "group_limited_greedy":
        per = e // n_group
        best = [max(s[g * per : (g + 1) * per]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: (-best[g], g))[:topk_group]
        allowed = [i for i in range(e) if i // per in groups]
    chosen = sorted(allowed, key=lambda i: (-s[i], i))[:k]
    weights = [s[i] for i in chosen]
    if k > 1 and norm:
        total = sum(weights)
        weights = [wt / total for wt in weights]
    else:
        weights = [wt * rsf for wt in weights]
    return chosen, weights
