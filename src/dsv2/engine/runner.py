"""Runs the model over the paged cache for one engine step: the step's tokens of every sequence (prefill
chunks and decode tokens alike) go through `DeepseekV2.forward_hidden` as one flat batch, with a
`PagedBackend` built from the step's metadata as the attention seam. No model math lives here.

Shapes: N tokens of the step, D hidden, V vocab, W cache row width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv2.engine.attention import StepMetadata
from dsv2.engine.backend import PagedBackend
from dsv2.engine.cache import PagedCache
from dsv2.engine.compiled import CompiledDecode
from dsv2.engine.config import EngineConfig
from dsv2.model import DeepseekV2
from dsv2.precision import native_low_precision
from dsv2.quant.swap import quantised_modules, set_int8_activations

LOGITS = ("last", "all", "none")


@dataclass(frozen=True)
class SeqWork:
    """One sequence's part of a step: run `tokens` at positions num_computed.., whose cache slots come
    from `block_table` (which must cover num_computed + len(tokens) tokens). logits: which of its new
    tokens need logits ("last": to sample the next token, "all", "none": a prefill chunk mid-prompt)."""

    block_table: list[int]
    num_computed: int
    tokens: list[int]
    logits: str = "last"


class ModelRunner:
    """Owns the per-step metadata and one scratch buffer; the sequences live in the scheduler, the rows
    in the `PagedCache`."""

    def __init__(self, model: DeepseekV2, cache: PagedCache, config: EngineConfig) -> None:
        self.model, self.cache, self.config = model, cache, config
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        # CPU without native bf16 GEMMs: decode attention in fp32 over upcast chunks of rows
        self.upcast = not native_low_precision(self.device, self.dtype)
        # rows per upcast chunk (~4 MiB of fp32, L3-resident): big enough that each chunk's two GEMMs split
        # well over the intra-op threads, small enough to stay in cache between them (MLA 1820, MHA 256)
        self.decode_chunk = config.decode_chunk or (max(256, (1 << 20) // cache.width) if self.upcast else 1 << 30)
        self._scratch: torch.Tensor | None = None
        # compile=True: decode-only steps run one compiled graph of the whole forward (dsv2.engine.compiled)
        self.compiled = CompiledDecode(model, cache) if config.compile else None
        # one quantised module, whose int8-activation switch tells whether they all follow this engine's config
        self._switch = next(iter(quantised_modules(model)), None)

    def scratch(self) -> torch.Tensor | None:
        """(decode_chunk, W) fp32 buffer for upcast chunks (None when rows are used as stored)."""
        if not self.upcast:
            return None
        if self._scratch is None:
            n = min(self.decode_chunk, self.cache.capacity_tokens)
            self._scratch = torch.empty(n, self.cache.width, dtype=torch.float32, device=self.device)
        return self._scratch

    def _own_switches(self) -> None:
        """The quantised modules' int8-activation switch as this engine's config says: another engine on the same
        model may have set it its own way since this one's last step (the modules hold one value for all)."""
        if self._switch is not None and self._switch.int8_activations != self.config.int8_activations:
            set_int8_activations(self.model, self.config.int8_activations)

    @torch.inference_mode()
    def execute(self, work: list[SeqWork]) -> list[torch.Tensor | None]:
        """Run one step; per item its logits: (V,) for "last", (T, V) for "all", None for "none".

        Token ids and positions must have been validated by the caller (the scheduler does, on the host)."""
        if not work:
            return []
        self._own_switches()
        if self.compiled is not None and self.compiled.supports(work):
            logits = self.compiled.run(work)  # None: this step's bucket did not compile, run it eagerly
            if logits is not None:
                return list(logits)
        ids, pos, pick, sizes = [], [], [], []
        for w in work:
            if w.logits not in LOGITS:
                raise ValueError(f"SeqWork.logits must be one of {LOGITS}, got {w.logits!r}")
            start = len(ids)
            ids.extend(w.tokens)
            pos.extend(range(w.num_computed, w.num_computed + len(w.tokens)))
            rows = [len(ids) - 1] if w.logits == "last" else list(range(start, len(ids))) if w.logits == "all" else []
            pick.extend(rows)
            sizes.append(len(rows))
        meta = StepMetadata(self.cache, [w.block_table for w in work], [w.num_computed for w in work],
                            [len(w.tokens) for w in work])
        backend = PagedBackend(self.cache, meta, self.config.decode_impl, self.upcast, self.decode_chunk,
                               self.config.key_block, self.scratch())
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1,N)
        pos_t = torch.tensor(pos, dtype=torch.long, device=self.device)  # (N,)
        hidden = self.model.forward_hidden(ids_t, pos_t, cache=backend, validate=False)[0]  # (N,D)
        if not pick:
            return [None] * len(work)
        picked = hidden if len(pick) == len(ids) else hidden[torch.tensor(pick, device=self.device)]  # (P,D)
        logits = self.model.lm_head(picked)  # (P,V)
        return [None if w.logits == "none" else (part[0] if w.logits == "last" else part)
                for w, part in zip(work, logits.split(sizes))]
