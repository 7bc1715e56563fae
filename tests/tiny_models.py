"""Tiny random causal-LM checkpoints for tests (llama, mistral, qwen2, gemma2), built from configs.

Weights are random and non-zero (norms around 1, biases small but non-zero); some shapes have element
counts that are not a multiple of the blocksize. A small BPE tokenizer trained in memory is saved too.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "gemma2")

_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=100,  # 64*100 = 6400 is a multiple of 64; odd_shapes=True breaks that
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_config(arch: str, tie_word_embeddings: bool = False, odd_shapes: bool = False, **overrides):
    """A transformers config for a tiny model of ``arch``."""
    from transformers import AutoConfig

    kw = dict(_COMMON, tie_word_embeddings=tie_word_embeddings)
    if odd_shapes:
        kw.update(hidden_size=48, intermediate_size=37, head_dim=12)  # 48*37 = 1776, not a multiple of 64
    if arch == "gemma2":
        kw.setdefault("head_dim", 16)
        kw.update(query_pre_attn_scalar=16, sliding_window=64)
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """Instantiate ``config`` with random, non-zero parameters (never all zeros)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.05 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model.to(dtype).eval()


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in memory, with bos/eos/unk but no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [
        "The capital of France is Paris.",
        "Quantization stores weights in four bits with blockwise absmax scaling.",
        "Low-rank adapters train a small number of parameters on a frozen base model.",
    ] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_checkpoint(
    directory: str | Path,
    arch: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    odd_shapes: bool = False,
    dtype: str = "bfloat16",
    seed: int = 0,
    max_shard_size: str | None = None,
    with_tokenizer: bool = True,
) -> Path:
    """Save a tiny random ``arch`` checkpoint (safetensors, config, tokenizer) into ``directory``."""
    directory = Path(directory)
    config = make_config(arch, tie_word_embeddings=tie_word_embeddings, odd_shapes=odd_shapes)
    if with_tokenizer:
        tokenizer = make_tokenizer(config.vocab_size)
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    model = random_model(config, seed=seed, dtype=getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kw)
    if with_tokenizer:
        tokenizer.save_pretrained(directory)
    return directory


def make_quantized_checkpoint(
    source: str | Path,
    directory: str | Path,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    skip_modules: tuple[str, ...] = (),
    max_shard_size: str | None = None,
) -> Path:
    """The reference bnb 4-bit checkpoint: transformers quantize-on-load (CPU) of ``source`` + save_pretrained.

    Tokenizer files of ``source`` are copied along; no qconv manifest is written.
    """
    import shutil

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    directory = Path(directory)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        llm_int8_skip_modules=list(skip_modules) or None,
    )
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, device_map="cpu")
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kw)
    for p in Path(source).iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")) or p.suffix in (".jinja", ".model", ".txt"):
            shutil.copyfile(p, directory / p.name)
    return directory
