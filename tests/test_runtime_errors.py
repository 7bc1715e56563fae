"""from_pretrained's errors: each a QconvError with a message naming the problem; verify only when asked."""

from __future__ import annotations

import json
import shutil

import pytest

from qconv import QconvError
from qconv import format as fmt
from qconv import runtime


@pytest.fixture
def bnb_dir(quantized_checkpoint_factory, tmp_path):
    """A private copy of a sharded reference checkpoint, with a manifest listing every file's sha256."""
    src = quantized_checkpoint_factory("llama", max_shard_size="20KB")
    out = tmp_path / "ckpt"
    shutil.copytree(src, out)
    files = {p.name: fmt.sha256_file(p) for p in sorted(out.iterdir())}
    settings = fmt.settings_from_quantization_config(json.loads((out / "config.json").read_text())["quantization_config"])
    fmt.write_manifest(out, fmt.Manifest(source={"id": "tiny", "kind": "dir"}, settings=settings.to_dict(), files=files))
    return out


def shards(directory):
    return sorted(directory.glob("model-*.safetensors"))


def test_plain_checkpoint_points_to_convert(tiny_checkpoint_factory):
    with pytest.raises(QconvError, match="qconv convert"):
        runtime.from_pretrained(tiny_checkpoint_factory("llama"))


def test_quantization_config_without_quantized_tensors(tiny_checkpoint_factory, quantized_checkpoint_factory, tmp_path):
    out = tmp_path / "fake"
    shutil.copytree(tiny_checkpoint_factory("llama"), out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = json.loads((quantized_checkpoint_factory("llama") / "config.json").read_text())["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QconvError, match="no bitsandbytes 4-bit weights.*qconv convert"):
        runtime.from_pretrained(out)


def test_not_bnb_4bit_quantization(bnb_dir):
    config = json.loads((bnb_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bnb_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(QconvError, match="not bitsandbytes 4-bit"):
        runtime.from_pretrained(bnb_dir)


def test_newer_manifest_schema_is_refused(bnb_dir):
    manifest = json.loads((bnb_dir / fmt.MANIFEST_NAME).read_text())
    manifest["schema_version"] = fmt.MANIFEST_SCHEMA_VERSION + 1
    (bnb_dir / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(QconvError, match="newer than this qconv"):
        runtime.from_pretrained(bnb_dir)


def test_missing_shard(bnb_dir):
    victim = shards(bnb_dir)[1]
    victim.unlink()
    with pytest.raises(QconvError, match=f"shard {victim.name} .* is missing"):
        runtime.from_pretrained(bnb_dir)


def test_index_path_escaping_the_directory(bnb_dir):
    index = json.loads((bnb_dir / fmt.INDEX_NAME).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (bnb_dir / fmt.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(QconvError, match="outside the checkpoint directory"):
        runtime.from_pretrained(bnb_dir)


def test_checksum_checked_only_with_verify(bnb_dir, monkeypatch):
    runtime.from_pretrained(bnb_dir, verify=True)  # intact: passes
    victim = shards(bnb_dir)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data; the header stays valid
    victim.write_bytes(bytes(data))
    with pytest.raises(QconvError, match=f"{victim.name}: sha256 mismatch"):
        runtime.from_pretrained(bnb_dir, verify=True)

    def no_hashing(*a, **k):
        raise AssertionError("the default load must not hash files")

    monkeypatch.setattr(fmt, "sha256_file", no_hashing)
    model, _ = runtime.from_pretrained(bnb_dir)  # default: no hashing, loads the changed bytes
    assert model is not None


def test_verify_without_manifest(quantized_checkpoint_factory):
    with pytest.raises(QconvError, match="verify=True needs qconv_manifest.json"):
        runtime.from_pretrained(quantized_checkpoint_factory("llama"), verify=True)


def test_truncated_shard(bnb_dir):
    victim = shards(bnb_dir)[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(QconvError, match=victim.name):
        runtime.from_pretrained(bnb_dir)


def test_offline_with_empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QconvError, match="acme/absent.*HF_HUB_OFFLINE"):
        runtime.from_pretrained("acme/absent")


def test_not_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(QconvError, match="no such directory"):
        runtime.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(QconvError, match="not a directory"):
        runtime.from_pretrained(tmp_path / "file.txt")


def test_missing_gpu(quantized_checkpoint_factory):
    with pytest.raises(QconvError, match="device_map: 'cuda:3' names a GPU that does not exist"):
        runtime.from_pretrained(quantized_checkpoint_factory("llama"), device_map="cuda:3")
