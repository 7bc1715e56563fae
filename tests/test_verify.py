"""``qconv verify`` (converter/verify.py, verify_source.py) on tiny conversions, intact and tampered with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qconv import format as fmt
from qconv.converter.cli import main
from qconv.converter.verify import verify_checkpoint
from qconv.converter.verify_source import THRESHOLDS, dequantize_reference

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def converted(tiny_checkpoint_factory, tmp_path_factory):
    """(source dir, converted dir) for a tiny llama, NF4 defaults."""
    from qconv.converter.conversion import convert

    src = tiny_checkpoint_factory("llama")
    out = convert(src, tmp_path_factory.mktemp("conv") / "out", progress=False).out_dir
    return src, out


@pytest.fixture
def copy(converted, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(converted[1], dst)
    return dst


def rewrite_shard(directory: Path, edit) -> None:
    """Apply ``edit(dict)`` to model.safetensors and re-hash it in the manifest (only structure checks see it)."""
    from safetensors.torch import load_file, save_file

    path = directory / fmt.SINGLE_SHARD_NAME
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=fmt.SAFETENSORS_METADATA)
    manifest = fmt.read_manifest(directory)
    manifest.files[path.name] = fmt.sha256_file(path)
    fmt.write_manifest(directory, manifest)


def only_problem(report, *needles: str) -> None:
    assert not report.ok
    assert any(all(n in p for n in needles) for p in report.problems), report.problems


def test_clean_conversion_passes_with_source(converted):
    src, out = converted
    report = verify_checkpoint(out, source=src)
    assert report.ok, report.problems
    assert report.counts["quantized"] == 14 and report.counts["kept"] == 7 and report.counts["compared"] == 21
    assert len(report.tensor_errors) == 14
    # measured NF4 error on N(0, 0.05) weights at blocksize 64 is ~0.092: really computed, below the limit
    assert all(0.07 < e < THRESHOLDS["nf4"] for e in report.tensor_errors.values()), report.tensor_errors


def test_reference_dequantization_matches_bitsandbytes():
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    for quant_type in ("nf4", "fp4"):
        for blocksize, double in ((64, True), (128, False), (256, True)):
            x = torch.randn(48, 512)  # in_features a multiple of the blocksize: bnb's CPU kernel is right here
            packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double)
            assert torch.equal(dequantize_reference(packed, state), F.dequantize_4bit(packed, state))


def test_tampered_files_are_caught(copy):
    data = bytearray((copy / fmt.SINGLE_SHARD_NAME).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / fmt.SINGLE_SHARD_NAME).write_bytes(bytes(data))
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    report = verify_checkpoint(copy)
    only_problem(report, "model.safetensors", "sha256")
    only_problem(report, "tokenizer.json", "sha256")


def test_missing_state_tensor(copy):
    rewrite_shard(copy, lambda t: t.pop(f"{Q_PROJ}.absmax"))
    only_problem(verify_checkpoint(copy), Q_PROJ, "missing", "absmax")


def test_wrong_shapes(copy):
    def edit(t):
        t[f"{Q_PROJ}.absmax"] = t[f"{Q_PROJ}.absmax"][:-1].clone()
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:-4].clone()
        t["model.layers.1.mlp.down_proj.weight.nested_quant_map"] = torch.zeros(255)
    rewrite_shard(copy, edit)
    report = verify_checkpoint(copy)
    only_problem(report, f"{Q_PROJ}.absmax", "expected U8 with 64 element(s)")
    only_problem(report, "model.layers.1.mlp.up_proj.weight: packed", "expected U8 [3200, 1]")
    only_problem(report, "nested_quant_map", "expected F32 with 256")


def test_orphan_state_tensor_and_bad_state_json(copy):
    def edit(t):
        t["model.layers.0.mlp.extra.weight.absmax"] = torch.zeros(3, dtype=torch.uint8)
        t[f"{Q_PROJ}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    rewrite_shard(copy, edit)
    report = verify_checkpoint(copy)
    only_problem(report, "model.layers.0.mlp.extra.weight.absmax", "without a quantized weight")
    only_problem(report, Q_PROJ, "unreadable packed quant state")


def test_wrong_source_fails(converted, tiny_checkpoint_factory):
    other = tiny_checkpoint_factory("llama", seed=1)
    report = verify_checkpoint(converted[1], source=other)
    errors = list(report.tensor_errors.values())
    assert len(errors) == 14 and min(errors) > 1.2  # independent weights: ~sqrt(2)
    assert sum("exceeds 0.15" in p for p in report.problems) == 14
    only_problem(report, "model.embed_tokens.weight", "differs from the source")


def test_missing_unlisted_and_config_problems(copy):
    (copy / "tokenizer.json").unlink()
    shutil.copyfile(copy / fmt.SINGLE_SHARD_NAME, copy / "extra.safetensors")
    config = json.loads((copy / fmt.CONFIG_NAME).read_text())
    del config["quantization_config"]
    (copy / fmt.CONFIG_NAME).write_text(json.dumps(config))
    report = verify_checkpoint(copy)
    only_problem(report, "tokenizer.json", "missing")
    only_problem(report, "extra.safetensors", "not listed")
    only_problem(report, "config.json", "no quantization_config")
    (copy / fmt.MANIFEST_NAME).unlink()
    only_problem(verify_checkpoint(copy), "no qconv_manifest.json")


def test_fp4_single_quant_tied_sharded_odd_shapes(tiny_checkpoint_factory, tmp_path):
    from qconv.converter.conversion import convert

    src = tiny_checkpoint_factory("qwen2", tie_word_embeddings=True, odd_shapes=True)
    settings = fmt.QuantSettings(quant_type="fp4", blocksize=128, double_quant=False)
    out = convert(src, tmp_path / "out", settings, max_shard_size="40KB", progress=False).out_dir
    assert (out / fmt.INDEX_NAME).is_file()
    report = verify_checkpoint(out, source=src)
    assert report.ok, report.problems
    assert report.thresholds == {"fp4": THRESHOLDS["fp4"]} and max(report.tensor_errors.values()) > 0.1


def test_cli_exit_status_and_problem_lines(converted, copy):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(converted[1]), "--source", str(converted[0])])
    assert ok.exit_code == 0 and "OK" in ok.output and "relative error vs source" in ok.output
    (copy / "generation_config.json").write_text("{}")
    bad = runner.invoke(main, ["verify", str(copy)])
    assert bad.exit_code == 1 and "FAILED (1 problem(s))" in bad.output
    assert "  - generation_config.json: sha256 differs" in bad.output
