"""The DeepSeek-V2 decoder: embed -> blocks (RMSNorm, attention, RMSNorm, MLP or MoE) -> norm -> lm_head.

Shapes: B batch, T new tokens, S cached + new tokens, D hidden_size, V vocab_size, E experts, K top-k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsv2.config import ModelConfig
from dsv2.model.attention import IMPLS, AttentionBackend, SdpaBackend, build_attention
from dsv2.model.layers import MLP, RMSNorm
from dsv2.model.moe import MoE, comm_balance_loss, device_balance_loss, expert_balance_loss
from dsv2.model.rope import Rotary


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.self_attn = build_attention(cfg, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device, dtype)
        self.mlp: nn.Module = (MoE(cfg, device, dtype) if cfg.is_moe_layer(layer_idx)
                               else MLP(cfg.hidden_size, cfg.intermediate_size, device, dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend,
                attn_impl: str = "expanded", **moe_kwargs: Any) -> torch.Tensor:
        """The decoder block, the only copy: x + attn(norm(x)), then + mlp(norm(·)). x (B,T,D)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend, self.layer_idx, attn_impl)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, **moe_kwargs) if isinstance(self.mlp, MoE) else self.mlp(h))


class DeepseekV2(nn.Module):
    """DeepSeek-V2 causal LM. `model(input_ids)` -> logits (B, T, V).

    Weights use the hub names (without the leading ``model.``, which checkpoint I/O adds).
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        # given its (uninitialised) weight, Embedding skips its own init: reset_parameters below is the one, and
        # normal_ on a meta tensor (from_pretrained's skeleton) would import Dynamo (~70 MiB resident)
        self.embed_tokens = nn.Embedding(config.vocab_size, d,
                                         _weight=torch.empty(config.vocab_size, d, device=device, dtype=dtype))
        self.layers = nn.ModuleList(DecoderLayer(config, i, device, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps, device, dtype)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = Rotary(config)
        if torch.device(device or "cpu").type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms (what the checkpoints start from)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)

    # ---- forward -----------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def check_input(self, input_ids: torch.Tensor, positions: torch.Tensor | None) -> None:
        """Clear errors for bad token ids / positions, before any work is done (reads the ids on the host:
        callers that validated their ids already, like the engine's scheduler, skip it)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): nothing to run")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = hi if hi >= self.config.vocab_size else lo
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        top = input_ids.shape[1] - 1 if positions is None else int(positions.max())  # max() of empty: caught above
        if top >= self.config.max_position_embeddings:
            raise ValueError(f"position {top} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings} (sequence too long)")

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                       cache: AttentionBackend | None = None, attn_impl: str = "expanded",
                       validate: bool = True, **moe_kwargs: Any) -> torch.Tensor:
        """Final-normed hidden states (B, T, D).

        cache: the attention backend of this forward (default: no cache, `SdpaBackend`). positions (B,T)
        or (T,); by default 0..T-1, or after the cache's tokens for a cache that has a length. validate:
        check ids and positions first (one host read of the ids).
        """
        if attn_impl not in IMPLS:
            raise ValueError(f"attn_impl must be one of {IMPLS}, got {attn_impl!r}")
        backend = SdpaBackend() if cache is None else cache
        if positions is None:
            if cache is not None and not hasattr(cache, "__len__"):
                raise ValueError(f"positions are required with a {type(cache).__name__}: it does not know how "
                                 "many tokens precede these (RoPE would silently restart at 0)")
            start = len(cache) if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[-1], device=input_ids.device)
        if validate:
            self.check_input(input_ids, positions)
        cos, sin = self.rope(positions)  # (…,T,R/2)
        x = self.embed_tokens(input_ids)  # (B,T,D)
        for layer in self.layers:
            x = layer(x, cos, sin, backend, attn_impl, **moe_kwargs)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: AttentionBackend | None = None, attn_impl: str = "expanded", return_aux: bool = False,
                capacity_factor: float | None = None, drop_exempt: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, T, V); with return_aux also the MoE balance losses and routing statistics.

        capacity_factor turns on device-level token dropping in training mode (never in eval mode);
        drop_exempt (B,) bool marks sequences that are never dropped.
        """
        moe_kwargs: dict[str, Any] = {}
        if self.config.is_moe:
            moe_kwargs = dict(capacity_factor=capacity_factor, drop_exempt=drop_exempt, keep_routing=return_aux)
        logits = self.lm_head(self.forward_hidden(input_ids, positions, cache, attn_impl, **moe_kwargs))
        if not return_aux:
            return logits
        return logits, self.aux_stats(input_ids.shape)

    def aux_stats(self, shape: torch.Size) -> dict[str, torch.Tensor]:
        """Balance losses (DeepSeek-V2 §2.2.3), summed over MoE layers, from the routing of the last forward."""
        c = self.config
        dev = self.lm_head.weight.device
        zero = torch.zeros((), device=dev)
        out = {"expert_loss": zero, "device_loss": zero, "comm_loss": zero, "aux_loss": zero,
               "dropped_frac": zero, "expert_load": torch.zeros(0, c.n_routed_experts or 0, device=dev)}
        moes = self.moe_layers()
        if not moes:
            return out
        b, t = shape
        g, m = c.n_group or 1, c.topk_group or 1
        loads, dropped = [], []
        for moe in moes:
            r = moe.last_routing
            assert r is not None, "forward(return_aux=True) keeps the routing"
            scores, idx = r.scores.view(b, t, -1), r.idx.view(b, t, -1)
            out["expert_loss"] = out["expert_loss"] + expert_balance_loss(scores, idx)
            out["device_loss"] = out["device_loss"] + device_balance_loss(scores, idx, g)
            out["comm_loss"] = out["comm_loss"] + comm_balance_loss(scores, idx, g, m)
            loads.append(torch.bincount(r.idx.flatten(), minlength=c.n_routed_experts).float())
            kept = moe.last_keep
            dropped.append(zero if kept is None else 1.0 - kept.float().mean())
        out["aux_loss"] = (c.aux_loss_alpha * out["expert_loss"] + c.device_aux_loss_alpha * out["device_loss"]
                           + c.comm_aux_loss_alpha * out["comm_loss"])
        out["expert_load"] = torch.stack(loads)  # (L_moe, E)
        out["dropped_frac"] = torch.stack(dropped).mean()
        return out

    # ---- checkpoints (hub layout) ------------------------------------------------------------
    # Checkpoint I/O lives in dsv2.checkpoint, which imports this module; this module never imports it.
    # Importing the dsv2 package runs dsv2.checkpoint.install(), which sets `_checkpoint_io` to an object
    # with load(path, ...) and save(model, path, ...). (Importing dsv2.model imports the dsv2 package
    # first, so the two methods work however DeepseekV2 was imported.)
    _checkpoint_io: Any = None  # (class attribute)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, weights: str | None = None,
                        group_size: int | None = None) -> DeepseekV2:
        """Load a hub-layout folder. weights="int8" | "int4" quantises while streaming the tensors
        (group_size for int4, default 128); a quantised folder (`dsv2 quantize`) loads as stored."""
        if cls._checkpoint_io is None:
            raise RuntimeError("checkpoint I/O is not installed: import dsv2 (dsv2.checkpoint.install())")
        return cls._checkpoint_io.load(path, dtype=dtype, device=device, weights=weights, group_size=group_size)

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "4GB",
                        dtype: torch.dtype | None = None) -> None:
        """Write config.json + safetensors in the hub layout (atomically; quantised models as quantised)."""
        if self._checkpoint_io is None:
            raise RuntimeError("checkpoint I/O is not installed: import dsv2 (dsv2.checkpoint.install())")
        self._checkpoint_io.save(self, path, max_shard_size=max_shard_size, dtype=dtype)
