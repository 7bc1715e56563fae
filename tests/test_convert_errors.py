"""Every input problem of ``qconv convert`` is one clear line, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qconv.converter.cli import main
from qconv.errors import QconvError


@pytest.fixture(scope="module")
def base(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory("llama")


@pytest.fixture
def src(base, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(base, tmp_path / "src"))


def run_cli(args: list[str], out_parent: Path) -> tuple[int, str]:
    """Invoke ``qconv convert``; check that nothing was left next to where the output would go."""
    before = set(out_parent.iterdir()) if out_parent.exists() else set()
    result = CliRunner().invoke(main, ["convert", "--no-progress", "--device", "cpu", *args])
    after = set(out_parent.iterdir()) if out_parent.exists() else set()
    assert after == before, f"left behind: {sorted(map(str, after - before))}"
    assert not isinstance(result.exception, (AssertionError, TypeError, KeyError, AttributeError)), result.exception
    lines = [line for line in result.stderr.splitlines() if line.startswith("qconv: error:")]
    assert len(lines) == 1, result.output
    return result.exit_code, lines[0]


def expect_error(args: list[str], tmp_path: Path, *fragments: str) -> str:
    out_parent = tmp_path / "outputs"
    out_parent.mkdir(exist_ok=True)
    code, line = run_cli([*args, "--out", str(out_parent / "out")], out_parent)
    assert code == 1
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_missing_source(tmp_path):
    expect_error([str(tmp_path / "nope")], tmp_path, str(tmp_path / "nope"), "not found")


def test_missing_gguf(tmp_path):
    expect_error([str(tmp_path / "model.gguf")], tmp_path, "model.gguf", "not found")


def test_no_weights(src, tmp_path):
    for f in src.glob("*.safetensors"):
        f.unlink()
    expect_error([str(src)], tmp_path, str(src), "no weights found")


def test_no_config(src, tmp_path):
    (src / "config.json").unlink()
    expect_error([str(src)], tmp_path, "config.json")


def test_truncated_safetensors(src, tmp_path):
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    expect_error([str(src)], tmp_path, "model.safetensors", "truncated")


def test_corrupt_safetensors(src, tmp_path):
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    expect_error([str(src)], tmp_path, "model.safetensors", "corrupt")


def _index(src: Path, shard: str) -> None:
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    weight_map = {k: "model.safetensors" for k in keys}
    weight_map[keys[-1]] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_names_missing_shard(src, tmp_path):
    _index(src, "model-00002-of-00002.safetensors")
    expect_error([str(src)], tmp_path, "model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist")


def test_index_path_outside_directory(src, tmp_path):
    shutil.copy(src / "model.safetensors", tmp_path / "outside.safetensors")  # exists, so only the escape is wrong
    _index(src, "../outside.safetensors")
    expect_error([str(src)], tmp_path, "../outside.safetensors", "outside the checkpoint directory")


def test_index_not_json(src, tmp_path):
    (src / "model.safetensors.index.json").write_text("{broken")
    expect_error([str(src)], tmp_path, "model.safetensors.index.json", "JSON")


@pytest.mark.parametrize("method", ["bitsandbytes", "gptq", "awq", "fp8"])
def test_already_quantized_config(src, tmp_path, method):
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    expect_error([str(src)], tmp_path, "already quantized", repr(method))


def test_already_quantized_tensors(src, tmp_path):
    """A GPTQ-style tensor gives it away even when config.json says nothing."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.qweight"] = torch.ones(4, 4, dtype=torch.int32)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    expect_error([str(src)], tmp_path, "already quantized", "qweight")


def test_qconv_output_is_refused_as_source(base, tmp_path):
    from qconv.converter.conversion import convert

    first = convert(base, tmp_path / "q", device="cpu", progress=False).out_dir
    expect_error([str(first)], tmp_path, "already quantized", "bitsandbytes")


def test_not_a_causal_lm(tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoConfig

    bert = tmp_path / "bert"
    bert.mkdir()
    AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37).save_pretrained(bert)
    save_file({"embeddings.word_embeddings.weight": torch.randn(8, 32)}, bert / "model.safetensors")
    expect_error([str(bert)], tmp_path, "'bert'", "not a causal language model")


def test_not_a_causal_lm_without_any_causal_class(src, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("vit", hidden_size=32).save_pretrained(src)  # vision encoder config over our weights
    expect_error([str(src)], tmp_path, "'vit'", "not a causal language model")


def test_unknown_model_type(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "definitely-not-a-model"
    (src / "config.json").write_text(json.dumps(config))
    expect_error([str(src)], tmp_path, "definitely-not-a-model", "not known to transformers")


def test_output_exists_without_overwrite(base, tmp_path):
    out_parent = tmp_path / "outputs"
    out = out_parent / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    code, line = run_cli([str(base), "--out", str(out)], out_parent)
    assert code == 1 and "--out" in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "mine"


def test_output_inside_source_is_refused(src, tmp_path):
    code, line = run_cli([str(src), "--out", str(src / "q"), "--overwrite"], src)
    assert code == 1 and "--out" in line


@pytest.mark.parametrize(
    "option,value,fragment",
    [
        ("--blocksize", "100", "--blocksize"),
        ("--compute-dtype", "int8", "--compute-dtype"),
        ("--quant-storage", "int4", "--quant-storage"),
        ("--max-shard-size", "lots", "--max-shard-size"),
        ("--device", "tpu", "--device"),
    ],
)
def test_unsupported_option_values(base, tmp_path, option, value, fragment):
    expect_error([str(base), option, value], tmp_path, fragment, value)


def test_push_flags_need_push(base, tmp_path):
    expect_error([str(base), "--repo-id", "me/x"], tmp_path, "--repo-id", "--push")


def test_python_api_raises_qconv_error(base, tmp_path):
    from qconv.converter.conversion import convert
    from qconv.format import QuantSettings

    with pytest.raises(QconvError, match="--quant-type"):
        convert(base, tmp_path / "o", QuantSettings(quant_type="int4"))
    assert not (tmp_path / "o").exists()
