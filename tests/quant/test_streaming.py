"""Streaming: `dsv2 init` and the quantising loader hold about one tensor at a time (peak RSS measured
in a child process against a bound derived from the checkpoint's size), and an init folder is a
hub-layout checkpoint transformers loads tensor for tensor."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv2 import DeepseekV2, ModelConfig
from dsv2.cli import main
from dsv2.quant import QuantError

# a `small` variant with 8x the routed experts and 4 layers, so the checkpoint (~260 MB in fp32) dwarfs the slack
BIG = dict(n_routed_experts=64, num_hidden_layers=4)
SLACK = 48 * 2**20  # allocator arenas, page tables, the loader's bookkeeping


def _child_peak(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints a JSON dict. `base` (RSS just before the measured
    part) and `peak` (the process's peak RSS at the end) are added, in bytes."""
    prog = textwrap.dedent("""
        import json, torch
        torch.set_num_threads(1)
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        import dsv2, dsv2.checkpoint, dsv2.quant.loader
        # warm-up: the first meta-device build and the first kernel calls load code (~80 MB of RSS)
        with torch.device("meta"):
            dsv2.DeepseekV2(dsv2.ModelConfig.from_preset("tiny"), device="meta")
        for w in ("int8", "int4"):
            dsv2.quant.QuantLinear.from_weight(torch.randn(64, 64), None, w, 32)(torch.randn(2, 64).bfloat16())
        base = rss()
        out = {}
    """) + textwrap.dedent(code) + textwrap.dedent("""
        # VmHWM: the peak of this process's own address space (ru_maxrss would include the RSS of the
        # pytest process this one was forked from)
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
        out.update(base=base, peak=int(hwm.split()[1]) * 1024)
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_fp32(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stream") / "big"
    ModelConfig.from_preset("small", **BIG).to_json(folder.parent / "big.json")  # --preset takes a config too
    assert main(["init", "--preset", str(folder.parent / "big.json"), "--out", str(folder), "--dtype", "fp32"]) == 0
    return folder


def _sizes(folder: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes of the largest one) from the files' headers."""
    total, largest = 0, 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = int(torch.tensor(shape).prod()) * 4
                total, largest = total + n, max(largest, n)
    return total, largest


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantising_load_peak_rss_is_the_quantised_size_plus_one_tensor(big_fp32, weights: str) -> None:
    total, largest = _sizes(big_fp32)
    r = _child_peak(f"""
        m = dsv2.DeepseekV2.from_pretrained({str(big_fp32)!r}, weights={weights!r})
        out["kept"] = sum(t.nbytes for t in m.state_dict().values())
    """)
    grown = r["peak"] - r["base"]
    # the quantised model, one fp32 source tensor mapped + its fp32 working copies, and slack
    bound = r["kept"] + 3 * largest + SLACK
    print(f"{weights}: grown {grown / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, fp32 {total / 2**20:.0f} MiB")
    assert grown <= bound, (grown, bound, total)
    assert bound < total  # the bound would catch a loader that held the float model


def test_float_load_does_not_need_twice_the_model(big_fp32) -> None:
    total, largest = _sizes(big_fp32)
    r = _child_peak(f"""
        m = dsv2.DeepseekV2.from_pretrained({str(big_fp32)!r})
        out["n"] = sum(p.numel() for p in m.parameters())
    """)
    assert r["peak"] - r["base"] <= total + 2 * largest + SLACK < 2 * total


def test_init_peak_rss_is_one_tensor_not_the_model(tmp_path, big_fp32) -> None:
    total, largest = _sizes(big_fp32)
    r = _child_peak(f"""
        from dsv2.config import ModelConfig
        cfg = ModelConfig.from_json({str(big_fp32)!r})
        dsv2.checkpoint.write_random_checkpoint(cfg, {str(tmp_path / "again")!r}, dtype=torch.float32)
    """)
    assert r["peak"] - r["base"] <= 2 * largest + SLACK < total


def test_init_folder_loads_in_transformers_tensor_for_tensor(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "small"
    assert main(["init", "--preset", "small", "--out", str(folder), "--dtype", "fp32", "--seed", "3"]) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_sd = hf.state_dict()
    cfg = ModelConfig.from_preset("small")
    n = 0
    with safe_open(folder / "model.safetensors", framework="pt") as st:
        for k in st.keys():
            t = st.get_tensor(k)
            if k in hf_sd:
                assert torch.equal(hf_sd[k], t), k
            else:  # transformers holds the experts fused: gate_up_proj (E, 2I, D), down_proj (E, D, I)
                layer, e, proj = k.split(".")[2], int(k.split(".")[5]), k.split(".")[6]
                fused_name = "down_proj" if proj == "down_proj" else "gate_up_proj"
                fused = hf_sd[f"model.layers.{layer}.mlp.experts.{fused_name}"]
                i = cfg.moe_intermediate_size
                part = fused[e] if proj == "down_proj" else fused[e][:i] if proj == "gate_proj" else fused[e][i:]
                assert torch.equal(part, t), k
            if k.endswith("norm.weight"):
                assert torch.equal(t, torch.ones_like(t)), k
            elif t.numel() > 10_000:
                assert abs(t.std().item() - cfg.initializer_range) < 0.05 * cfg.initializer_range, k
            n += t.numel()
    assert n == sum(p.numel() for p in DeepseekV2(cfg, device="meta").parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    ours = DeepseekV2.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.isfinite(hf(ids).logits).all() and ours(ids).shape == (1, 12, cfg.vocab_size)
    # the same seed writes the same bytes; another seed does not
    assert main(["init", "--preset", "small", "--out", str(tmp_path / "b"), "--dtype", "fp32", "--seed", "3"]) == 0
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_quantize_cli_round_trip_and_errors(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    assert main(["init", "--preset", "tiny", "--out", str(src), "--seed", "2"]) == 0
    (src / "tokenizer.json").write_text("{}")
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "q"), "--weights", "int4",
                 "--group-size", "32"]) == 0
    assert (tmp_path / "q" / "tokenizer.json").read_text() == "{}"
    q = DeepseekV2.from_pretrained(tmp_path / "q")
    direct = DeepseekV2.from_pretrained(src, weights="int4", group_size=32)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(q(ids), direct(ids))
    assert main(["quantize", "--model", str(src), "--out", str(src), "--weights", "int8"]) == 2
    assert "is the source folder" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "q8"), "--weights", "int8"]) == 2
    assert "already quantised" in capsys.readouterr().err
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "x"), "--dtype", "int8"]) == 2
    assert "--dtype must be one of fp32, bf16, fp16" in capsys.readouterr().err
    with pytest.raises(QuantError, match="group_size"):
        DeepseekV2.from_pretrained(src, weights="int4", group_size=100)
