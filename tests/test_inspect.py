"""``qconv inspect`` (converter/inspect_checkpoint.py), and the end-to-end CLI path: convert -> verify -> inspect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from qconv import format as fmt
from qconv.converter.cli import main
from qconv.converter.inspect_checkpoint import format_table, inspect_checkpoint


@pytest.fixture(scope="module")
def converted(tiny_checkpoint_factory, tmp_path_factory):
    from qconv.converter.conversion import convert

    src = tiny_checkpoint_factory("llama")
    return src, convert(src, tmp_path_factory.mktemp("conv") / "out", progress=False).out_dir


def source_params(src) -> int:
    from safetensors import safe_open

    with safe_open(str(src / fmt.SINGLE_SHARD_NAME), framework="pt") as f:
        return sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in f.keys())


def test_inspect_reports_counts_sizes_settings_and_fixes(converted):
    src, out = converted
    info = inspect_checkpoint(out)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 2 and info["vocab_size"] == 384
    assert info["params"] == source_params(src)  # untied tiny llama: every source tensor is 1-D or 2-D
    assert (info["quantized_tensors"], info["kept_tensors"]) == (14, 7) and info["kept_dtypes"] == {"BF16": 7}
    assert info["weight_bytes"] == (out / fmt.SINGLE_SHARD_NAME).stat().st_size
    assert info["bits_per_param"] == round(8 * info["tensor_bytes"] / info["params"], 3)
    q = info["quantization"]
    assert (q["quant_types"], q["blocksizes"], q["double_quant"], q["compute_dtype"]) == (["nf4"], [64], True, "bfloat16")
    assert info["source"]["kind"] == "dir" and info["source"]["id"] == str(src.resolve())
    kinds = {f["kind"]: f["applied"] for f in info["tokenizer_fixes"]}
    assert kinds["pad_token"] is True and kinds["chat_template"] is False
    manifest = fmt.read_manifest(out)
    assert info["params"] == manifest.stats["params"]
    table = format_table(info)
    assert "14 quantized, 7 kept" in table and "[fixed] pad_token" in table and "nf4, blocksize 64" in table


def test_inspect_reads_headers_only(converted):
    code = ("import sys; from qconv.converter.inspect_checkpoint import inspect_checkpoint; "
            f"inspect_checkpoint({str(converted[1])!r}); "
            "assert not {'torch', 'transformers', 'bitsandbytes', 'safetensors.torch'} & set(sys.modules), sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_inspect_a_plain_transformers_bnb_checkpoint(tiny_checkpoint_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint_factory("llama")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=fmt.QuantSettings().bnb_config(),
                                                 dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    info = inspect_checkpoint(tmp_path)
    assert info["manifest"] is False and info["source"] is None and info["quantized_tensors"] == 14
    assert "no qconv manifest" in format_table(info)


def test_inspect_cli_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "no config.json" in result.output
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    result = runner.invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "model.safetensors" in result.output and "header" in result.output


def test_end_to_end_cli_new_pad_token(tmp_path):
    """A tokenizer with no pad and no free token: convert adds <|pad|>, grows the embeddings, syncs the configs;
    verify (against the source) and inspect agree; transformers loads the result and pads with the new id."""
    from test_tokenizer_fix import build_tokenizer
    from tiny_models import make_config, random_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_tokenizer(tmp_path / "src", specials=("<s>", "</s>"), unk=None)
    rows = len(AutoTokenizer.from_pretrained(src))
    # in_features multiples of the blocksize: bitsandbytes' CPU forward (0.50.2) cannot run anything else
    config = make_config("llama", vocab_size=rows, bos_token_id=0, eos_token_id=1, intermediate_size=128,
                         num_hidden_layers=1)
    model = random_model(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = 0  # an untrained row for --fix-untrained-tokens
    model.save_pretrained(src)

    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["convert", str(src), "-o", str(out), "--no-progress", "--fix-untrained-tokens"])
    assert result.exit_code == 0, result.output

    fixes = {f["kind"]: f for f in fmt.read_manifest(out).tokenizer_fixes}
    assert fixes["pad_token"]["applied"] and fixes["pad_token"]["after"]["token"] == "<|pad|>"
    assert fixes["untrained_rows"]["applied"] and fixes["untrained_rows"]["before"]["ids"] == [5]
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.pad_token, tok.pad_token_id) == ("<|pad|>", rows)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert cfg["pad_token_id"] == gen["pad_token_id"] == rows and cfg["vocab_size"] == rows + 1

    result = runner.invoke(main, ["verify", str(out), "--source", str(src)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["vocab_size"] == rows + 1
    assert {"kind": "pad_token", "applied": True}.items() <= next(
        f for f in info["tokenizer_fixes"] if f["kind"] == "pad_token").items()

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.get_input_embeddings().weight.shape[0] == rows + 1
    batch = tok(["hello world", "the capital of france is paris"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1].item() == rows  # padded on the right with the new token
    with torch.no_grad():
        logits = loaded(**batch).logits
    assert logits.shape[-1] == rows + 1 and torch.isfinite(logits).all()
