"""Quality of a quantised cache against a reference cache: teacher-forced KL and greedy agreement.

The reference engine decodes greedily for `steps` tokens (or is fed a given continuation, e.g. held-out
text); every other engine is fed the *same* tokens (teacher forcing, so one early disagreement does not
derail the rest) and its next-token distribution is compared at every step: mean KL(p_ref || p_mode)
and the fraction of steps with the same argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv2.engine.engine import Engine
from dsv2.engine.runner import SeqWork
from dsv2.model import DeepseekV2


@dataclass(frozen=True)
class KVQuality:
    mode: str
    bytes_per_token: int
    bits_per_element: float
    mean_kl: float
    greedy_agreement: float


def _logits_along(engine: Engine, prompt: list[int], forced: list[int] | None, steps: int
                  ) -> tuple[list[int], torch.Tensor]:
    """Decode `steps` tokens (greedy, or the `forced` ones); the (steps, V) fp32 log-probs at each."""
    runner = engine.runner
    with engine.reserve(len(prompt) + steps) as blocks:
        logits = runner.execute([SeqWork(blocks, 0, prompt)])[0]
        toks, out = [], []
        for i in range(steps):
            out.append(logits.float().log_softmax(-1))
            toks.append(int(logits.argmax()) if forced is None else forced[i])
            if i + 1 < steps:
                logits = runner.execute([SeqWork(blocks, len(prompt) + i, [toks[-1]])])[0]
        return toks, torch.stack(out)


def kv_quality(model: DeepseekV2, prompt: list[int], steps: int = 512, modes: list[tuple[str, bool]] | None = None,
               reference: str = "bf16", continuation: list[int] | None = None, **engine_kw) -> list[KVQuality]:
    """Compare each (kv_cache_dtype, rope_bf16) mode with the `reference` cache over `steps` decode steps.

    The tokens fed back are the reference's greedy ones, or `continuation` (at least `steps` tokens) when given.
    """
    if continuation is not None:
        if len(continuation) < steps:
            raise ValueError(f"continuation has {len(continuation)} tokens, steps={steps} needs that many")
        continuation = list(continuation[:steps])
    modes = modes or [("bf16", False), ("fp8", False), ("fp8", True), ("int8", False), ("int8", True),
                      ("int4", False), ("int4", True), ("mixed", False)]
    budget = len(prompt) + steps
    ref = Engine(model, kv_cache_dtype=reference, max_tokens=budget, **engine_kw)
    toks, ref_lp = _logits_along(ref, prompt, continuation, steps)
    out = []
    for name, rope_bf16 in modes:
        eng = Engine(model, kv_cache_dtype=name, rope_bf16=rope_bf16, max_tokens=budget, **engine_kw)
        _, lp = _logits_along(eng, prompt, toks, steps)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0).mean().item()
        agree = (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean().item()
        rep = eng.cache_report()
        out.append(KVQuality(str(rep["kv_cache_dtype"]), int(rep["bytes_per_token"]),
                             float(rep["bits_per_element"]), kl, agree))
    return out
