"""dsv2.fuse: gate/up joined into one matmul changes no parameter, no result, no gradient."""

from __future__ import annotations

import copy

import torch

from dsv2 import DeepseekV2, ModelConfig
from dsv2.fuse import fuse_gate_up

from ._reference import randomize_


def _pair() -> tuple[DeepseekV2, DeepseekV2]:
    model = DeepseekV2(ModelConfig.from_preset("tiny"), dtype=torch.float32)
    randomize_(model, seed=4)
    return model, copy.deepcopy(model)


def test_fused_model_has_the_same_parameters_and_results() -> None:
    model, plain = _pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    n_blocks = sum(1 for _ in model.modules() if type(_).__name__ in ("MLP", "Experts"))
    assert fuse_gate_up(model) == n_blocks > 0 and fuse_gate_up(model) == 0  # idempotent
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params[k] for k, p in model.named_parameters())
    assert all(m.fused_gate_up() is None for m in model.modules() if hasattr(m, "fused_gate_up"))  # grad mode
    with torch.no_grad():
        assert all(m.fused_gate_up() is not None for m in model.modules() if hasattr(m, "fused_gate_up"))
        for ids in (torch.tensor([[5]]), torch.randint(0, model.config.vocab_size, (2, 9))):
            torch.testing.assert_close(model(ids), plain(ids), rtol=1e-5, atol=1e-6)


def test_training_and_later_casts_take_the_two_matmul_path() -> None:
    model, plain = _pair()
    fuse_gate_up(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    model(ids).float().square().mean().backward()
    plain(ids).float().square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    model.to(torch.bfloat16), plain.to(torch.bfloat16)  # the parameters stop being views: no joined path
    with torch.no_grad():
        assert all(m.fused_gate_up() is None for m in model.modules() if hasattr(m, "fused_gate_up"))
        assert torch.equal(model(ids), plain(ids))


def test_unfuse_gives_plain_parameters_back() -> None:
    from dsv2.fuse import unfuse_gate_up

    model, plain = _pair()
    fuse_gate_up(model)
    n = unfuse_gate_up(model)
    assert n > 0 and unfuse_gate_up(model) == 0
    for m in model.modules():
        assert "_gate_up" not in m.__dict__
    mlp = model.layers[0].mlp
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() != mlp.up_proj.weight.untyped_storage().data_ptr()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.is_contiguous() and torch.equal(p, q), name
