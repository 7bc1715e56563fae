"""A real model end to end: the embedded SmolLM2-135M GGUF -> qconv NF4 -> plain transformers still says Paris."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_gguf_converts_and_still_answers(smollm2_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qconv.converter import convert
    from qconv.format import read_manifest

    out = tmp_path / "smollm2-nf4"
    result = convert(str(smollm2_gguf), out, device="cpu", progress=False)
    manifest = read_manifest(out)
    assert manifest.source["kind"] == "gguf" and manifest.source["id"] == smollm2_gguf.name
    assert len(manifest.source["sha256"]) == 64
    stats = result.stats
    assert 134e6 < stats["params"] < 135e6  # tied lm_head counted once
    assert stats["quantized_tensors"] == 30 * 7 and 4 < stats["bits_per_param"] < 7
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 30 * 7
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.startswith(" Paris"), repr(answer)
