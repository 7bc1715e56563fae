"""qconv.runtime.from_pretrained against transformers.from_pretrained on the same bnb 4-bit directories (CPU).

Reference checkpoints come from transformers' own quantize-on-load + save_pretrained, so these tests do not
depend on the converter. Logits must be bit-identical with patch=False.
"""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from qconv import runtime


def stock_fast_path_off(model):
    """bitsandbytes' CPU AVX512-BF16 path repacks weights in place and depends on the CPU: keep tests portable."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def reference(directory, **kw):
    from transformers import AutoModelForCausalLM

    return stock_fast_path_off(AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", **kw))


def logits(model, seed=0, vocab=384):
    ids = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def assert_same_model(ours, ref):
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ours_sd) == set(ref_sd)
    for name, tensor in ref_sd.items():
        assert ours_sd[name].dtype == tensor.dtype, name
        assert torch.equal(ours_sd[name], tensor), name
    ours_p, ref_p = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert {n: (type(p).__name__, p.requires_grad) for n, p in ours_p.items()} == {
        n: (type(p).__name__, p.requires_grad) for n, p in ref_p.items()
    }
    for (n, b), (_, rb) in zip(ours.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), n
    a, b = logits(ours), logits(ref)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


CASES = {
    "llama": dict(arch="llama"),
    "qwen2": dict(arch="qwen2"),
    "gemma2": dict(arch="gemma2"),
    "mistral-tied": dict(arch="mistral", source_kw={"tie_word_embeddings": True}),
    "llama-odd-sharded": dict(arch="llama", source_kw={"odd_shapes": True}, max_shard_size="20KB"),
    "qwen2-fp4-single-quant": dict(arch="qwen2", quant_type="fp4", double_quant=False, compute_dtype="float32"),
    "llama-skip-modules": dict(arch="llama", skip_modules=("model.layers.1.mlp", "lm_head")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(quantized_checkpoint_factory, case):
    directory = quantized_checkpoint_factory(**CASES[case])
    model, tokenizer = runtime.from_pretrained(directory, dtype=torch.bfloat16, patch=False)
    assert model._qconv["fallback"] is False
    assert_same_model(stock_fast_path_off(model), reference(directory))
    assert tokenizer is not None and tokenizer("Paris").input_ids


def test_quantized_modules_and_attributes(quantized_checkpoint_factory):
    import bitsandbytes as bnb

    directory = quantized_checkpoint_factory("llama", skip_modules=("model.layers.1.mlp",))
    model, _ = runtime.from_pretrained(directory)
    assert model.model.layers[0].mlp.down_proj.__class__ is bnb.nn.Linear4bit
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear  # stored unquantized: stays a Linear
    w = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(w, bnb.nn.Params4bit) and w.bnb_quantized and w.quant_state.nested
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # dtype=None on the CPU
    assert model.is_loaded_in_4bit and model.is_quantized and model.hf_quantizer.pre_quantized
    assert model.quantization_method == "bitsandbytes"
    assert model.config.quantization_config.load_in_4bit
    assert not model.training
    assert model.hf_device_map == {"": "cpu"}
    assert all(p.device.type == "cpu" for p in model.parameters())
    rss = model._qconv["rss_mib"]  # [VmRSS, VmHWM] MiB at each phase mark (Linux)
    if sys.platform.startswith("linux"):
        assert list(rss)[0] == "start" and {"headers", "skeleton", "read_done", "filled", "tokenizer", "patched"} <= set(rss)
        assert all(0 < now <= peak for now, peak in rss.values())
        peaks = [peak for name, (_, peak) in rss.items() if name != "reading_started"]  # that one: another thread
        assert peaks == sorted(peaks)  # a high-water mark never falls
    assert gc.isenabled() and model._qconv["timings"]["gc_collect_s"] >= 0.0  # the GC pause is over


def test_tied_embeddings_share_storage(quantized_checkpoint_factory):
    directory = quantized_checkpoint_factory("mistral", source_kw={"tie_word_embeddings": True})
    model, _ = runtime.from_pretrained(directory, patch=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_device_map_dict_and_errors(quantized_checkpoint_factory):
    from qconv import QconvError

    directory = quantized_checkpoint_factory("llama")
    model, _ = runtime.from_pretrained(directory, device_map={"model": "cpu", "lm_head": "cpu"}, dtype="float16")
    assert model.lm_head.weight.dtype == torch.float16 and model.hf_device_map == {"model": "cpu", "lm_head": "cpu"}
    with pytest.raises(QconvError, match="no entry covers 'lm_head.weight'"):
        runtime.from_pretrained(directory, device_map={"model": "cpu"})
    with pytest.raises(QconvError, match="GPU that does not exist"):
        runtime.from_pretrained(directory, device_map="cuda:7")
    with pytest.raises(QconvError, match="GPU that does not exist"):
        runtime.from_pretrained(directory, device_map={"": 7})
    with pytest.raises(QconvError, match="dtype"):
        runtime.from_pretrained(directory, dtype="int8")


def test_max_seq_length_applies_linear_rope_scaling(quantized_checkpoint_factory):
    from transformers import AutoConfig

    directory = quantized_checkpoint_factory("llama")
    model, tok = runtime.from_pretrained(directory, dtype=torch.bfloat16, max_seq_length=1024, patch=False)
    assert tok.model_max_length == 1024
    rope = model.config.rope_parameters
    assert rope["rope_type"] == "linear" and rope["factor"] == pytest.approx(4.0)
    assert model.config.max_position_embeddings == 1024
    config = AutoConfig.from_pretrained(directory)
    default_inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, default_inv_freq / 4, rtol=0, atol=0)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": 4.0}
    config.max_position_embeddings = 1024
    assert torch.equal(logits(stock_fast_path_off(model)), logits(reference(directory, config=config)))
    # within the native window nothing changes but the tokenizer's limit
    model, tok = runtime.from_pretrained(directory, max_seq_length=128, patch=False)
    assert tok.model_max_length == 128 and model.config.rope_parameters["rope_type"] == "default"


def test_lora_ready_with_peft(quantized_checkpoint_factory):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    directory = quantized_checkpoint_factory("qwen2")
    model, _ = runtime.from_pretrained(directory, patch=False)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert sum("q_proj.lora_A" in n for n in lora) == 2  # both layers' Linear4bit got adapters
    peft_model.train()
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(1))
    out = peft_model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in lora.items() if "lora_B" in n]  # B starts at zero, so its grad is the signal
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_names_needing_transformers_rules_fall_back(quantized_checkpoint_factory, tmp_path):
    """A checkpoint saved without the ``model.`` prefix: transformers knows how to map it, so we hand over."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = quantized_checkpoint_factory("llama")
    out = tmp_path / "no-prefix"
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    model, _ = runtime.from_pretrained(out, dtype=torch.bfloat16, patch=False, max_seq_length=512)
    assert model._qconv["fallback"] is True and model.is_loaded_in_4bit
    assert model.config.rope_parameters["rope_type"] == "linear"  # the adjusted config went along
    from transformers import AutoConfig

    from qconv.runtime.skeleton import apply_max_seq_length

    config = AutoConfig.from_pretrained(src)
    apply_max_seq_length(config, 512)
    ref = reference(src, config=config)
    assert torch.equal(logits(stock_fast_path_off(model)), logits(ref))


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, qconv.runtime; print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
