"""A compiled decode step: the whole forward of a decode-only step (embedding -> blocks -> norm -> lm_head)
captured by torch.compile (inductor) as one graph, for `EngineConfig(compile=True)`.

A decode step of a small model is overhead-bound: ~670 eager aten ops (norms, RoPE, MoE routing and
dispatch, cache bookkeeping, small GEMVs) for a few MB of weights. Compiled, the step is one C++ wrapper
calling fused loops and a few GEMM kernels.

Nothing here is model math: the graph is `DeepseekV2.forward_hidden` itself, run with
  - `DecodeBackend`, an attention backend (the model's `AttentionBackend` seam) whose state is tensors
    only: the new rows are written at their slots, and every sequence attends over its rows gathered
    into one padded batch (`gathered_mla_decode`, the gathered path of `PagedBackend`), or, for MLA over
    a plain CPU cache, through its block table by the opaque op `paged_latent_decode` (the eager
    per-sequence attention); the slot of every row is computed in the graph from the padded block
    tables, so nothing about the step's sequences (their lengths, their blocks) is a Python value the
    graph would be specialised on;
  - routed experts swapped (module swap, `static_experts`) for a formulation without the eager
    dispatch's host sync (bincount -> list of counts): each token's top-k experts' weights are read by
    index in fused multiply-reduce loops, nothing gathered or copied.
Shapes: B decoding sequences (each one new token), NB block-table width padded to a power of two,
S = NB * block_size padded rows per sequence.

Steps with prefill tokens (or more than `MAX_BATCH` sequences) run eagerly, as without compile.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from dsv2.engine.backend import gathered_gqa_decode, gathered_mla_decode
from dsv2.engine.cache import PagedCache
from dsv2.fuse import unfuse_gate_up
from dsv2.model import GQA, MLA, DeepseekV2
from dsv2.model.moe import Experts

if TYPE_CHECKING:
    from dsv2.engine.runner import SeqWork


@torch.library.custom_op("dsv2::paged_latent_decode", mutates_args=())
def paged_latent_decode(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, pos: torch.Tensor, c: int,
                        scale: float) -> torch.Tensor:
    """Absorbed attention of B absorbed queries q (B,H,C+R) over their sequences' rows in one plain CPU pool
    (num_blocks, block_size, C+R), sequence b's rows being tokens 0..pos[b] through block table tables[b]
    -> latent outputs (B,H,C) fp32. The eager per-sequence path (`latent_decode` over zero-copy runs of
    consecutive blocks), as one opaque op of the compiled step: there it replaces a gather of every row
    into a padded batch, which cost more than it saved beyond ~1K rows."""
    from dsv2.engine.attention import latent_decode, slot_runs
    from dsv2.precision import native_low_precision

    rows = pool.view(-1, pool.shape[2])
    upcast = not native_low_precision(q.device, q.dtype)
    out = torch.empty(q.shape[0], q.shape[1], c, dtype=torch.float32, device=q.device)
    for b, (table, p) in enumerate(zip(tables.tolist(), pos.tolist())):
        runs = slot_runs(table, p + 1, pool.shape[1])  # consecutive blocks: one contiguous view each
        out[b] = latent_decode(q[b], [rows[s: s + n] for s, n in runs], c, scale, upcast)
    return out


@paged_latent_decode.register_fake
def _(q: torch.Tensor, pool: torch.Tensor, tables: torch.Tensor, pos: torch.Tensor, c: int,
      scale: float) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], c, dtype=torch.float32)


class DecodeBackend:
    """Attention of B decoding tokens (flattened as batch 1) over the paged cache, compile-friendly: rows
    are written at `slots` (B,), then read back gathered by `index` (B,S) with `valid` (B,S) masking the
    padding; MLA over a plain CPU cache reads them through the block tables instead (`paged_latent_decode`)."""

    def __init__(self, cache: PagedCache, slots: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                 tables: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> None:
        self.cache, self.slots, self.index, self.valid = cache, slots, index, valid
        self.tables, self.pos = tables, pos

    def mla(self, attn: MLA, layer_idx: int, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
            k_pe: torch.Tensor, impl: str) -> torch.Tensor:
        self.cache.write(layer_idx, self.slots, torch.cat((c_kv, k_pe), dim=-1).flatten(0, 1))
        pool = self.cache.pools[layer_idx]
        if self.tables is not None and self.cache.format.plain and pool[0].device.type == "cpu":
            q = attn.absorb_query(q_nope[0], q_pe[0])  # (B,H,C+R)
            o_lat = paged_latent_decode(q, pool[0], self.tables, self.pos, attn.kv_rank, attn.scale)
            return attn.absorbed_output(o_lat.to(q.dtype)).to(q_nope.dtype)[None]
        return gathered_mla_decode(self.cache, attn, layer_idx, q_nope[0], q_pe[0], self.index, self.valid)[None]

    def gqa(self, attn: GQA, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            impl: str) -> torch.Tensor:
        self.cache.write(layer_idx, self.slots, torch.cat((k.flatten(2), v.flatten(2)), dim=-1).flatten(0, 1))
        return gathered_gqa_decode(self.cache, attn, layer_idx, q[0], self.index, self.valid)[None]


class _StaticExperts:
    """Mixin of the swapped experts classes: under torch.compile, `Experts.gathered`; eagerly, as before."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling() and keep is None:
            return self.gathered(x, idx, weight, self.gate_proj, self.up_proj, self.down_proj)
        return super().forward(x, idx, weight, keep)


_SWAPPED: dict[type, type] = {}


def swap_experts(model: torch.nn.Module) -> None:
    """Module swap: every routed `Experts` (of whatever subclass a precision pass gave it) gets the
    compile-friendly forward; parameters, state-dict keys and eager results are unchanged. Idempotent."""
    for m in model.modules():
        cls = type(m)
        if isinstance(m, Experts) and not isinstance(m, _StaticExperts):
            if cls not in _SWAPPED:
                _SWAPPED[cls] = type(f"Static{cls.__name__}", (_StaticExperts, cls), {})
            m.__class__ = _SWAPPED[cls]


def is_decode_step(work: Sequence[SeqWork]) -> bool:
    """Whether a step is decode-only: every sequence runs one new token after cached ones, logits of it."""
    return all(len(w.tokens) == 1 and w.num_computed > 0 and w.logits == "last" for w in work)


def _bucket(n: int, floor: int = 1) -> int:
    """The power of two >= max(n, floor)."""
    n = max(n, floor)
    return 1 << (n - 1).bit_length()


# inductor settings of the compiled step on the CPU: the wrapper is C++ (no Python per kernel), the
# weights are frozen (constants: the GEMMs get pre-packed weights) and the GEMMs are inductor's own C++
# templates (at batch 1-8 they are GEMVs, which MKL's sgemm runs at ~7 GB/s here, the templates at
# 25-40). Only the C++ templates are offered, so nothing is benchmarked: compiling is faster and the
# choice does not depend on the machine's load at that moment; a graph for which a template does not
# apply is compiled again with inductor's defaults (`FALLBACK_OPTIONS`).
CPU_OPTIONS = {"cpp_wrapper": True, "freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
FALLBACK_OPTIONS = {"cpp_wrapper": True, "freezing": True, "max_autotune": False, "max_autotune_gemm_backends": "ATEN"}


class CompiledDecode:
    """The compiled decode step of one engine (model + cache): `run(work)` -> logits (B,V), or None when the
    step is not one it runs (prefill tokens, more than MAX_BATCH sequences).

    One graph per (batch bucket, context bucket): B is padded to a power of two by repeating the last
    sequence (the copy computes exactly what it computes and writes the same row to the same slot), the
    block tables to a power of two of at least MIN_ROWS rows, so a generation compiles a handful of
    graphs (log2 of the batch x log2 of the context). Each graph is captured once through torch.compile
    (fullgraph, static shapes) and then called directly, without Dynamo's guards (~0.1-0.5 ms a call on
    this model): the engine fixes everything the guards would check (the model, the cache pools, shapes
    by bucket). The weights are frozen into the graphs: the model must not change after the first step.
    """

    MAX_BATCH = 64
    MIN_ROWS = 256  # smallest padded context: fewer graphs; gathering 256 rows costs microseconds
    # a CPU cache in a quantised format is read by gathering rows into a padded batch in the graph, which
    # costs more than the eager per-sequence attention beyond ~2K rows (2-layer V2-Lite-attention model, 2 Zen
    # 4 cores: 3.5-5 ms a step slower at 2.5-4K), so longer contexts decode eagerly there; a plain cache is
    # read through the block tables by `paged_latent_decode` at any length
    MAX_CPU_ROWS = 2048

    def __init__(self, model: DeepseekV2, cache: PagedCache, options: dict | None = None) -> None:
        self.model, self.cache = model, cache
        self.device = model.embed_tokens.weight.device
        self.options = dict(CPU_OPTIONS if self.device.type == "cpu" else {}, **(options or {}))
        unfuse_gate_up(model)  # frozen weights must not be views of one storage (inductor fuses on its own)
        swap_experts(model)
        self.graphs: dict[tuple[int, int], tuple[Callable, list]] = {}
        self._captured: Callable | None = None
        self._dynamo = torch.compile(self._step, fullgraph=True, dynamic=False, backend=self._backend)
        self.compile_s = 0.0  # seconds spent capturing and compiling graphs
        self.failed: dict[tuple[int, int], str] = {}  # buckets that did not compile: they run eagerly

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        try:
            compiled = compile_fx(gm, example_inputs, config_patches=self.options)
        except Exception as e:
            if self.device.type != "cpu" or self.options == FALLBACK_OPTIONS:
                raise
            warnings.warn(f"compiled decode step: inductor's C++ GEMM templates do not apply ({type(e).__name__}: "
                          f"{str(e)[:200]}); compiling with its default GEMMs", stacklevel=2)
            compiled = compile_fx(gm, example_inputs, config_patches=FALLBACK_OPTIONS)

        def first_call(*args):
            self._captured = (compiled, args)
            return compiled(*args)
        return first_call

    def supports(self, work: Sequence[SeqWork]) -> bool:
        if not (0 < len(work) <= self.MAX_BATCH and is_decode_step(work)):
            return False
        if self.device.type != "cpu" or self.cache.format.plain:
            return True
        return max(w.num_computed + 1 for w in work) <= self.MAX_CPU_ROWS

    def _step(self, ids: torch.Tensor, pos: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """ids, pos (B,): the new token of each sequence and its position (= its cached tokens);
        tables (B,NB) block tables padded with block 0. -> logits (B,V)."""
        bs = self.cache.block_size
        j = torch.arange(tables.shape[1] * bs, device=tables.device)  # (S,)
        index = tables[:, j // bs] * bs + j % bs  # (B,S) slot of every row
        valid = j[None, :] <= pos[:, None]  # (B,S) rows of tokens 0..pos
        slots = index.gather(1, pos[:, None])[:, 0]  # (B,) where the new rows go
        backend = DecodeBackend(self.cache, slots, index, valid, tables, pos)
        hidden = self.model.forward_hidden(ids[None], pos, cache=backend, validate=False)[0]  # (B,D)
        return self.model.lm_head(hidden)

    def inputs(self, work: Sequence[SeqWork]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, pos, tables) of the step, padded to its buckets."""
        bs = self.cache.block_size
        b = _bucket(len(work))
        nb = _bucket(max(-(-(w.num_computed + 1) // bs) for w in work), -(-self.MIN_ROWS // bs))
        nb = min(nb, self.cache.num_blocks)
        rows = list(work) + [work[-1]] * (b - len(work))
        tables = torch.zeros(b, nb, dtype=torch.long)
        for i, w in enumerate(rows):
            t = w.block_table[:nb]
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        ids = torch.tensor([w.tokens[0] for w in rows], dtype=torch.long)
        pos = torch.tensor([w.num_computed for w in rows], dtype=torch.long)
        return ids.to(self.device), pos.to(self.device), tables.to(self.device)

    def run(self, work: Sequence[SeqWork]) -> torch.Tensor | None:
        """Logits (B,V) of a decode-only step (see `supports`); None when its bucket could not be compiled
        (the caller runs the step eagerly; the failure is kept in `failed` and warned about once)."""
        ids, pos, tables = self.inputs(work)
        key = (ids.shape[0], tables.shape[1])
        graph = self.graphs.get(key)
        if graph is None:
            if key in self.failed:
                return None
            from torch._inductor import config as inductor_config

            t0 = time.perf_counter()
            self._captured = None
            try:
                # the inductor settings are on while Dynamo traces too (it lifts frozen weights differently)
                with (torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20),
                      inductor_config.patch(self.options)):
                    out = self._dynamo(ids, pos, tables)
                graph = self._layout(self._captured, (ids, pos, tables))
            except Exception as e:
                self.failed[key] = f"{type(e).__name__}: {str(e)[:500]}"
                warnings.warn(f"compiled decode step: batch bucket {key[0]} x {key[1]} blocks did not compile, "
                              f"it runs eagerly ({self.failed[key][:200]})", stacklevel=2)
                return None
            finally:
                self.compile_s += time.perf_counter() - t0
            self.graphs[key] = graph
            return out[: len(work)]
        fn, layout = graph
        args = (ids, pos, tables)
        return fn(*[args[a] if isinstance(a, int) else a for a in layout])[0][: len(work)]

    def _layout(self, captured: tuple[Callable, tuple] | None, inputs: tuple[torch.Tensor, ...]
                ) -> tuple[Callable, list]:
        """How to call a captured graph again: each of its arguments is one of the step's inputs (by
        index) or a tensor the engine keeps fixed (a cache pool, a weight), passed as it was."""
        if captured is None:
            raise RuntimeError("torch.compile ran no graph for the decode step")
        fixed = {id(t) for pool in self.cache.pools for t in pool}
        fixed |= {id(t) for m in self.model.modules() for t in (*m.parameters(False), *m.buffers(False),
                                                               *vars(m).values()) if isinstance(t, torch.Tensor)}
        fn, args = captured
        layout: list = []
        for a in args:
            hit = [i for i, t in enumerate(inputs) if a is t]
            if not hit and id(a) not in fixed:
                raise RuntimeError(f"the compiled decode step takes an argument it cannot re-derive: "
                                   f"{type(a).__name__} {getattr(a, 'shape', a)}")
            layout.append(hit[0] if hit else a)
        return fn, layout
