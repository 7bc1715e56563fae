"""Byte-exactness against transformers + bitsandbytes, and plain-transformers loading of the output.

For every case the converter's output is compared with what ``AutoModelForCausalLM.from_pretrained(src,
quantization_config=BitsAndBytesConfig(...), device_map="cpu", dtype=<compute dtype>).save_pretrained()``
writes: same key set, and for every tensor the same dtype, shape and bytes. The reference runs in ONE
subprocess that never imports qconv (tests/reference_bnb.py); it also loads qconv's output with plain
``from_pretrained(out)`` and compares logits with the quantize-on-load model (exact equality on the CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qconv.converter.conversion import convert
from qconv.format import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    QuantSettings,
    quantized_weight_names,
    read_packed_state_json,
)

# name -> (arch, checkpoint options, settings, convert options)
CASES = {
    "llama": ("llama", {}, QuantSettings(), {"max_shard_size": "60KB"}),
    "mistral": ("mistral", {}, QuantSettings(), {}),
    "qwen2": ("qwen2", {}, QuantSettings(), {}),
    "gemma2": ("gemma2", {}, QuantSettings(), {}),
    "llama-odd-tied": ("llama", {"odd_shapes": True, "tie_word_embeddings": True}, QuantSettings(), {}),
    "llama-fp4-bs128-nodq": ("llama", {}, QuantSettings(quant_type="fp4", blocksize=128, double_quant=False), {}),
    "qwen2-fp32src-fp16-bs32": ("qwen2", {"dtype": "float32", "odd_shapes": True},
                                QuantSettings(blocksize=32, compute_dtype="float16"), {}),
    "mistral-skip-storage": ("mistral", {}, QuantSettings(skip_modules=("lm_head", "mlp.down_proj"),
                                                          quant_storage="bfloat16"), {}),
}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}, path
            for key in f.keys():
                assert key not in out, f"{key} in two shards"
                out[key] = f.get_tensor(key)
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def runs(tiny_checkpoint_factory, tmp_path_factory):
    """Convert every case, then run the reference subprocess once for all of them."""
    root = tmp_path_factory.mktemp("exact")
    cases = []
    for name, (arch, ckpt_kw, settings, convert_kw) in CASES.items():
        src = tiny_checkpoint_factory(arch, **ckpt_kw)
        out = root / f"{name}-out"
        convert(src, out, settings, device="cpu", progress=False, fix_tokenizer=False, **convert_kw)
        cases.append({"name": name, "src": str(src), "out": str(out), "ref_dir": str(root / f"{name}-ref"),
                      "settings": settings.to_dict()})
    cases_path = root / "cases.json"
    cases_path.write_text(json.dumps(cases))
    script = Path(__file__).with_name("reference_bnb.py")
    proc = subprocess.run([sys.executable, str(script), str(cases_path)], capture_output=True, text=True,
                          cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["name"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    return {c["name"]: (c, results[c["name"]]) for c in cases}


@pytest.mark.parametrize("name", list(CASES))
def test_tensors_byte_identical_to_transformers(runs, name):
    case, _ = runs[name]
    ours, ref = _tensors(Path(case["out"])), _tensors(Path(case["ref_dir"]))
    assert set(ours) == set(ref)
    quantized = quantized_weight_names(ref)
    assert quantized, "the reference quantized nothing"
    for key in sorted(ref):
        assert ours[key].dtype == ref[key].dtype, key
        assert ours[key].shape == ref[key].shape, key
        assert _bytes(ours[key]) == _bytes(ref[key]), f"{name}: bytes differ for {key}"


@pytest.mark.parametrize("name", list(CASES))
def test_plain_transformers_loads_output_with_equal_logits(runs, name):
    _, result = runs[name]
    assert result["qconv_imported"] is False
    assert result["finite"]
    assert result["linear4bit"] > 0
    assert result["equal"], f"{name}: logits differ by {result['max_abs_diff']}"


@pytest.mark.parametrize("name", list(CASES))
def test_config_matches_transformers(runs, name):
    case, _ = runs[name]
    ours = json.loads((Path(case["out"]) / CONFIG_NAME).read_text())
    ref = json.loads((Path(case["ref_dir"]) / CONFIG_NAME).read_text())
    assert ours == ref
    gen_ours = json.loads((Path(case["out"]) / GENERATION_CONFIG_NAME).read_text())
    gen_ref = json.loads((Path(case["ref_dir"]) / GENERATION_CONFIG_NAME).read_text())
    assert gen_ours == gen_ref


def test_settings_reach_the_packed_state(runs):
    case, _ = runs["llama-fp4-bs128-nodq"]
    tensors = _tensors(Path(case["out"]))
    states = quantized_weight_names(tensors)
    assert set(states.values()) == {"fp4"}
    for weight in states:
        meta = read_packed_state_json(tensors[f"{weight}.quant_state.bitsandbytes__fp4"])
        assert meta["blocksize"] == 128 and "nested_blocksize" not in meta
        assert f"{weight}.nested_absmax" not in tensors


def test_kept_tensors_and_tied_weights(runs):
    case, _ = runs["llama-odd-tied"]
    tensors = _tensors(Path(case["out"]))
    assert "lm_head.weight" not in tensors  # tied to the embeddings: written once
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    meta = read_packed_state_json(tensors["model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"])
    assert meta["shape"] == [48, 37] and (48 * 37) % 64 != 0


def test_skip_modules_stay_unquantized(runs):
    case, _ = runs["mistral-skip-storage"]
    tensors = _tensors(Path(case["out"]))
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # packed in bf16 storage
    assert "model.layers.0.mlp.up_proj.weight.absmax" in tensors
    assert "model.layers.0.mlp.down_proj.weight.absmax" not in tensors


def test_sharded_output_has_a_consistent_index(runs):
    case, _ = runs["llama"]
    out = Path(case["out"])
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    from safetensors import safe_open

    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == shard
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    assert len(index["weight_map"]) == len(_tensors(out))
    # a quantized weight and its state tensors share a shard
    for weight in quantized_weight_names(index["weight_map"]):
        assert index["weight_map"][f"{weight}.absmax"] == index["weight_map"][weight]
