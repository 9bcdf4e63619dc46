"""ModelConfig: the DeepSeek-V2 architecture as one dataclass with the hub ``config.json`` names.

Only architecture lives here (no batch size, device, dtype or cache length). Fields that the hub
files carry but that do not change the math (``architectures``, ``auto_map``, ...) are kept so a
config.json survives a round trip. dsv2's own extensions (attention baselines, the device and
communication balance-loss weights) have names no hub file uses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODEL_TYPE = "deepseek_v2"
ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")
TOPK_METHODS = ("greedy", "group_limited_greedy")
ROPE_TYPES = ("default", "yarn")


# keys a written config.json carries that are derived from the fields, so reading drops them
_DERIVED_KEYS = ("architectures", "head_dim", "torch_dtype", "dtype", "qk_head_dim", "transformers_version")


class ConfigError(ValueError):
    """A config.json or preset that does not describe a valid DeepSeek-V2 model."""


@dataclass
class ModelConfig:
    # --- core transformer -------------------------------------------------------------------
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # hub field; only the GQA baseline reads it
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None
    # --- MLA ----------------------------------------------------------------------------------
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # --- DeepSeekMoE --------------------------------------------------------------------------
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = 6
    moe_intermediate_size: int = 1408
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    topk_method: str = "greedy"
    n_group: int | None = 1
    topk_group: int | None = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001  # α1, expert-level balance loss (hub field)
    seq_aux: bool = True
    # --- dsv2 extensions (no hub file uses these names) ---------------------------------------
    attention_type: str = "mla"  # mla | mha | gqa | mqa (baselines of the same model dims)
    baseline_head_dim: int | None = None  # d_h of the baselines; None -> v_head_dim
    device_aux_loss_alpha: float = 0.0  # α2, device-level balance loss over n_group groups
    comm_aux_loss_alpha: float = 0.0  # α3, communication balance loss (topk_group = M)
    # --- carried through unchanged ------------------------------------------------------------
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(dict(self.rope_scaling))
        self.validate()

    # ---- derived quantities ------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["type"]

    @property
    def head_dim(self) -> int:
        """d_h of the MHA/GQA/MQA baselines."""
        return self.baseline_head_dim or self.v_head_dim

    @property
    def kv_heads(self) -> int:
        """Number of K/V heads of the baseline attention (MLA reports the heads it serves)."""
        if self.attention_type == "mqa":
            return 1
        if self.attention_type == "gqa":
            return self.num_key_value_heads or self.num_attention_heads
        return self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, i: int) -> bool:
        """DeepSeekMoE layer rule: routed experts from `first_k_dense_replace` on, every `moe_layer_freq`."""
        return self.is_moe and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def kv_elements_per_token_per_layer(self) -> int:
        """Cached elements per token per layer (Table 1 of the paper)."""
        if self.attention_type == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_heads * self.head_dim

    def softmax_scale(self) -> float:
        """1/sqrt(d_nope + d_R), times mscale(s, mscale_all_dim)^2 under yarn."""
        d = self.qk_head_dim if self.attention_type == "mla" else self.head_dim
        scale = d**-0.5
        rs = self.rope_scaling
        if rs is not None and rs["type"] == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Parameter count computed from the config alone (no model built)."""
        d = self.hidden_size
        per_layer_attn = _attention_params(self)
        total = 0
        for i in range(self.num_hidden_layers):
            total += per_layer_attn + 2 * d  # two RMSNorms
            if self.is_moe_layer(i):
                e, mi = self.n_routed_experts or 0, self.moe_intermediate_size
                total += e * 3 * d * mi + e * d  # routed experts + router
                total += 3 * d * mi * (self.n_shared_experts or 0)
            else:
                total += 3 * d * self.intermediate_size
        total += d  # final norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu', got {self.hidden_act!r}")
        need(self.attention_type in ATTENTION_TYPES,
             f"attention_type must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        if self.attention_type == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
            need(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
            need(self.q_lora_rank is None or self.q_lora_rank > 0,
                 f"q_lora_rank must be null or > 0, got {self.q_lora_rank}")
        else:
            need(self.head_dim % 2 == 0, f"baseline head dim must be even, got {self.head_dim}")
        if self.attention_type == "gqa":
            kv = self.num_key_value_heads
            need(kv is not None and kv > 0 and self.num_attention_heads % kv == 0,
                 f"attention_type 'gqa' needs num_key_value_heads dividing num_attention_heads="
                 f"{self.num_attention_heads}, got num_key_value_heads={kv}")
        need(self.rope_type in ROPE_TYPES,
             f"unknown rope type {self.rope_type!r} in rope_scaling; supported: {ROPE_TYPES}")
        if self.rope_type == "yarn":
            rs = self.rope_scaling or {}
            for key in ("factor", "original_max_position_embeddings"):
                need(key in rs, f"rope_scaling of type 'yarn' needs {key!r}; got keys {sorted(rs)}")
            need(rs["factor"] >= 1, f"rope_scaling.factor must be >= 1, got {rs['factor']}")
        if self.is_moe:
            e, k = self.n_routed_experts, self.num_experts_per_tok
            need(k is not None and 0 < k <= e,
                 f"num_experts_per_tok must be in 1..n_routed_experts={e}, got {k}")
            need(self.moe_layer_freq >= 1, f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
            need(self.first_k_dense_replace >= 0,
                 f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
            need(self.topk_method in TOPK_METHODS,
                 f"unknown topk_method {self.topk_method!r}; supported: {TOPK_METHODS}")
            need(self.scoring_func == "softmax",
                 f"scoring_func must be 'softmax' for DeepSeek-V2, got {self.scoring_func!r}")
            g, m = self.n_group or 1, self.topk_group or 1
            need(g >= 1 and e % g == 0,
                 f"n_routed_experts={e} must be divisible by n_group={g}")
            need(1 <= m <= g, f"topk_group={m} must be in 1..n_group={g}")
            if self.topk_method == "group_limited_greedy":
                need(k <= m * (e // g),
                     f"num_experts_per_tok={k} exceeds the experts in the kept groups "
                     f"(topk_group={m} x n_routed_experts/n_group={e // g} = {m * (e // g)})")

    # ---- I/O ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        mt = d.pop("model_type", MODEL_TYPE)
        if mt != MODEL_TYPE:
            raise ConfigError(f"config.json has model_type={mt!r}; dsv2 reads {MODEL_TYPE!r} only")
        # transformers 5 form: rope_parameters = {rope_type, rope_theta, factor, ...}
        rp = d.pop("rope_parameters", None)
        if rp is not None and d.get("rope_scaling") is None:
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            rtype = rp.get("rope_type", rp.get("type", "default"))
            d["rope_scaling"] = None if rtype == "default" else rp
        for derived in _DERIVED_KEYS:  # written by to_dict / transformers from the other fields
            d.pop(derived, None)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        if isinstance(kwargs.get("eos_token_id"), list):  # a list of eos ids: keep the first
            extra["eos_token_id_list"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model_type": MODEL_TYPE, "architectures": ["DeepseekV2ForCausalLM"]}
        d.update(self.extra)
        for f in fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        if "eos_token_id_list" in d:  # a config that listed several eos ids keeps them all
            d["eos_token_id"] = d.pop("eos_token_id_list")
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        d["head_dim"] = self.qk_rope_head_dim  # what transformers expects under its own name
        d.pop("auto_map", None)  # dsv2 checkpoints need no remote code
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def load(cls, name_or_path: str | Path) -> ModelConfig:
        """A preset name, a config.json path or a checkpoint folder."""
        if str(name_or_path) in PRESETS:
            return cls.from_preset(str(name_or_path))
        p = Path(name_or_path)
        if p.exists():
            return cls.from_json(p)
        raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                          "nor an existing config.json / checkpoint folder")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention-temperature factor: 0.1·m·ln(s) + 1 for s > 1, else 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _normalise_rope_scaling(rs: dict[str, Any]) -> dict[str, Any]:
    # the hub uses "type", transformers 5 "rope_type": keep one key, "type"
    rtype = rs.pop("rope_type", None) or rs.get("type") or "default"
    rs["type"] = rtype
    rs.pop("rope_theta", None)
    return rs


def _attention_params(c: ModelConfig) -> int:
    d, h = c.hidden_size, c.num_attention_heads
    if c.attention_type == "mla":
        q = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
             if c.q_lora_rank else d * h * c.qk_head_dim)
        kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
        kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
        return q + kv + h * c.v_head_dim * d
    hd = c.head_dim
    return d * h * hd + 2 * d * c.kv_heads * hd + h * hd * d


_V2_COMMON: dict[str, Any] = dict(
    vocab_size=102400, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512,
    first_k_dense_replace=1, rope_theta=10000.0, max_position_embeddings=163840,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    norm_topk_prob=False, rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001,
    n_shared_experts=2, num_experts_per_tok=6, moe_layer_freq=1,
)

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v2": dict(
        _V2_COMMON, num_hidden_layers=60, hidden_size=5120, num_attention_heads=128,
        num_key_value_heads=128, q_lora_rank=1536, n_routed_experts=160, moe_intermediate_size=1536,
        intermediate_size=12288, topk_method="group_limited_greedy", n_group=8, topk_group=3,
        routed_scaling_factor=16.0, aux_loss_alpha=0.003, device_aux_loss_alpha=0.05,
        comm_aux_loss_alpha=0.02,
    ),
    "deepseek-v2-lite": dict(
        _V2_COMMON, num_hidden_layers=27, hidden_size=2048, num_attention_heads=16,
        num_key_value_heads=16, q_lora_rank=None, n_routed_experts=64, moe_intermediate_size=1408,
        intermediate_size=10944, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, aux_loss_alpha=0.001,
    ),
    # The paper's reference point for the -93.3% KV claim: dense, GQA with 8 KV heads of d_h 128.
    "deepseek-67b": dict(
        vocab_size=102400, num_hidden_layers=95, hidden_size=8192, num_attention_heads=64,
        num_key_value_heads=8, attention_type="gqa", baseline_head_dim=128,
        intermediate_size=22016, n_routed_experts=None, n_shared_experts=None,
        num_experts_per_tok=None, max_position_embeddings=4096, rope_scaling=None,
        bos_token_id=100000, eos_token_id=100001,
    ),
    # ~0.26M parameters with every feature on (q compression, grouped MoE, yarn): for fast tests.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.0, bos_token_id=1, eos_token_id=2,
    ),
    # ~30M parameters: a DeepSeek-V2 in miniature that trains on 2 CPU cores in minutes.
    "small": dict(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=6, kv_lora_rank=128, q_lora_rank=192,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096,
        rope_scaling=None, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=256, first_k_dense_replace=1, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=1.0, aux_loss_alpha=0.001,
        device_aux_loss_alpha=0.0, comm_aux_loss_alpha=0.0, bos_token_id=1, eos_token_id=2,
    ),
}
