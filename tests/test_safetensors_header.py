"""qconv/safetensors_header.py: headers and index read exactly as safetensors reads them, bad files refused."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconv import format as fmt
from qconv import safetensors_header as sh
from qconv.errors import QconvError


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    torch.manual_seed(0)
    tensors = {
        "a.weight": torch.randn(33, 7, dtype=torch.bfloat16),
        "b.packed": torch.randint(1, 255, (1000, 1), dtype=torch.uint8),
        "c.bias": torch.randn(5, dtype=torch.float32),
        "d.scalar": torch.tensor(3.5, dtype=torch.float64),
        "e.half": torch.randn(3, 4, 5, dtype=torch.float16),
        "f.empty": torch.empty(0, 4, dtype=torch.float32),
        "g.ids": torch.arange(1, 18, dtype=torch.int64),
        "h.mask": torch.tensor([True, False, True]),
        "i.f8": torch.randn(9).to(torch.float8_e4m3fn),
        "j.i16": torch.arange(1, 8, dtype=torch.int16),
    }
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    return path


def raw_file(path, header, data: bytes = b"", length: int | None = None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def test_valid_file_matches_safe_open(shard):
    header = sh.read_header(shard)
    assert header.path == shard and header.size == shard.stat().st_size
    assert header.data_start == 8 + struct.unpack("<Q", shard.read_bytes()[:8])[0]
    with safe_open(str(shard), framework="pt") as f:
        assert header.metadata == f.metadata() == {"format": "pt", "note": "x"}
        assert sorted(header.tensors) == sorted(f.keys())
        for name, entry in header.tensors.items():
            ref_slice = f.get_slice(name)
            ref = f.get_tensor(name)
            assert entry.name == name and entry.file == shard
            assert entry.dtype == ref_slice.get_dtype(), name
            assert list(entry.shape) == ref_slice.get_shape(), name
            assert entry.torch_dtype() == ref.dtype, name
            assert entry.numel == ref.numel() and entry.nbytes == ref.numel() * ref.element_size(), name
            # the offsets point at exactly the tensor's bytes
            assert entry.read_bytes() == ref.reshape(-1).view(torch.uint8).numpy().tobytes(), name
    # the tensors tile the data section with no gap
    spans = sorted((e.start, e.end) for e in header.tensors.values())
    assert spans[0][0] == header.data_start and spans[-1][1] == header.size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_dtype_table_agrees_with_torch():
    for name, (size, torch_name) in sh.DTYPES.items():
        if hasattr(torch, torch_name):
            assert sh.torch_dtype(name).itemsize == size == sh.itemsize(name), name
            assert sh.SAFETENSORS_DTYPE_OF_TORCH[torch_name] == name
    with pytest.raises(QconvError, match="'Q4' is not supported"):
        sh.torch_dtype("Q4")


def test_no_torch_import(shard):
    code = ("import sys; from qconv.safetensors_header import read_header; "
            f"h = read_header({str(shard)!r}); assert len(h.tensors) == 10; "
            "h.tensors['c.bias'].read_bytes(); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _cut(shard, tmp_path, n: int):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(shard.read_bytes()[:n])
    return path


def test_truncated_files(shard, tmp_path):
    size = shard.stat().st_size
    with pytest.raises(QconvError, match="does not fit"):  # data cut
        sh.read_header(_cut(shard, tmp_path, size - 3))
    with pytest.raises(QconvError, match="corrupt safetensors header"):  # header cut
        sh.read_header(_cut(shard, tmp_path, 40))
    with pytest.raises(QconvError, match="too short"):
        sh.read_header(_cut(shard, tmp_path, 5))
    with pytest.raises(QconvError, match="missing"):
        sh.read_header(tmp_path / "absent.safetensors")


def test_header_length_beyond_the_file_or_cap(tmp_path):
    with pytest.raises(QconvError, match=r"length 1000 exceeds the \d+-byte file"):
        sh.read_header(raw_file(tmp_path / "x.safetensors", {}, length=1000))
    big = sh.MAX_HEADER_BYTES + 1
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # a sparse file larger than the cap, so only the cap refuses it
        f.write(struct.pack("<Q", big))
        f.truncate(big + 16)
    with pytest.raises(QconvError, match="100 MB cap"):
        sh.read_header(path)


@pytest.mark.parametrize(
    "blob,match",
    [
        (b'{"x": {"dtype": "F32",', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"__metadata__": {"a": 1}}', "__metadata__ is not an object of strings"),
    ],
)
def test_bad_json(tmp_path, blob, match):
    path = raw_file(tmp_path / "bad.safetensors", blob)
    with pytest.raises(QconvError, match=match) as exc:
        sh.read_header(path)
    assert "bad.safetensors" in str(exc.value)


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    "header,data,match",
    [
        ({"x": F32x4}, b"\0" * 8, "'x' has byte range \\[0, 16\\) that does not fit"),  # beyond the file
        ({"x": {**F32x4, "data_offsets": [8, 4]}}, b"\0" * 16, "does not fit"),  # end before begin
        ({"x": {**F32x4, "shape": [3]}}, b"\0" * 16, "does not fit"),  # nbytes != numel * itemsize
        ({"x": {**F32x4, "data_offsets": [-4, 12]}}, b"\0" * 16, "does not fit"),
        ({"x": F32x4, "y": {**F32x4, "data_offsets": [8, 24]}}, b"\0" * 24, "'y' overlaps"),
        ({"x": {**F32x4, "data_offsets": [4, 20]}}, b"\0" * 20, "'x' leaves a gap"),
        ({"x": F32x4}, b"\0" * 20, "4 bytes after the last tensor"),
        ({"x": {**F32x4, "shape": [-4]}}, b"\0" * 16, "negative dimension"),
        ({"x": {"shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "'x' has a malformed header entry"),
        ({"x": {**F32x4, "shape": [True, 4]}}, b"\0" * 16, "malformed"),
        ({"x": {**F32x4, "data_offsets": ["0", "16"]}}, b"\0" * 16, "malformed"),
        ({"x": {**F32x4, "data_offsets": [0, 16, 32]}}, b"\0" * 16, "malformed"),
        ({"x": [1]}, b"\0" * 16, "malformed"),
    ],
)
def test_bad_entries(tmp_path, header, data, match):
    """Refused with a message naming the file and tensor, and safetensors refuses the same file."""
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(QconvError, match=match) as exc:
        sh.read_header(path)
    assert str(path) in str(exc.value)
    with pytest.raises(Exception):
        with safe_open(str(path), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_unsupported_dtype_names_file_and_tensor(tmp_path):
    path = raw_file(tmp_path / "q.safetensors", {"layer.q": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(QconvError, match=r"q\.safetensors: tensor 'layer\.q' has unsupported dtype 'Q4'"):
        sh.read_header(path)


def _two_shards(directory):
    save_file({"a": torch.ones(3), "b": torch.zeros(2, 2)}, str(directory / "s1.safetensors"))
    save_file({"c": torch.arange(4, dtype=torch.int32)}, str(directory / "s2.safetensors"))
    weight_map = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    (directory / fmt.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_index_resolves_shards(tmp_path):
    weight_map = _two_shards(tmp_path)
    index = sh.read_index(tmp_path)
    assert {k: p.name for k, p in index.items()} == weight_map
    assert all(p.parent == tmp_path.resolve() for p in index.values())
    assert [p.name for p in sh.weight_files(tmp_path)] == ["s1.safetensors", "s2.safetensors"]
    tensors = sh.read_all_headers(tmp_path)
    assert sorted(tensors) == ["a", "b", "c"] and tensors["c"].dtype == "I32" and tensors["b"].shape == (2, 2)
    assert tensors["c"].file == index["c"]


def test_index_with_missing_shard_or_escaping_path(tmp_path):
    weight_map = _two_shards(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(QconvError, match=f"shard s2.safetensors listed in {fmt.INDEX_NAME} is missing"):
        sh.read_index(tmp_path)
    with pytest.raises(QconvError, match="s2.safetensors .* is missing"):
        sh.read_all_headers(tmp_path)
    weight_map["c"] = "../outside.safetensors"
    save_file({"c": torch.ones(1)}, str(tmp_path.parent / "outside.safetensors"))
    (tmp_path / fmt.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(QconvError, match="'../outside.safetensors' points outside the checkpoint directory"):
        sh.index_shards(tmp_path)
    for bad in ({"weight_map": {}}, {"weight_map": {"a": 3}}, [1], "nope"):
        (tmp_path / fmt.INDEX_NAME).write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(QconvError, match=fmt.INDEX_NAME):
            sh.read_index(tmp_path)


def test_tensor_stored_twice(tmp_path):
    save_file({"a": torch.ones(3)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(3)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(QconvError, match=r"'a' is stored twice \(x.safetensors and y.safetensors\)"):
        sh.read_all_headers(tmp_path)
