"""The converter's CUDA path (marked ``gpu``): byte-exact against transformers' quantize-on-load on the GPU.

Small shards force many shard files, so several shard writers, the pinned host blocks and the
device-to-host copies all take part. The reference is ``from_pretrained(quantization_config=..., device_map
={"": 0}).save_pretrained()`` in this process (it never touches qconv code).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def _tensors(directory: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                out[key] = (t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return out


@pytest.mark.parametrize("arch, source_kw", [("llama", {"odd_shapes": True, "tie_word_embeddings": True}),
                                             ("gemma2", {})])
def test_gpu_convert_is_byte_exact_and_loads_in_plain_transformers(tiny_checkpoint_factory, tmp_path, arch, source_kw):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qconv.converter.conversion import convert
    from qconv.format import QuantSettings

    src = tiny_checkpoint_factory(arch, **source_kw)
    result = convert(src, tmp_path / "qconv", QuantSettings(), device="cuda", max_shard_size="8KB", progress=False)
    assert result.stats["device"].startswith("cuda") and result.stats["shards"] > 3
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    ref_model = AutoModelForCausalLM.from_pretrained(src, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    ref_model.save_pretrained(tmp_path / "ref")
    ours, ref = _tensors(tmp_path / "qconv"), _tensors(tmp_path / "ref")
    assert ours.keys() == ref.keys()
    different = [k for k in ref if ours[k] != ref[k]]
    assert not different, different[:5]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qconv", device_map={"": 0})
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a, b = loaded(ids).logits, ref_model(ids).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)
