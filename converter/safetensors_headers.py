"""Read a checkpoint's safetensors headers (names, dtypes, shapes, byte ranges) without loading tensor data.

Used by ``qconv inspect`` and ``qconv verify``: both must stay fast on multi-GiB checkpoints, so they parse
the header (8-byte little-endian length + JSON) themselves and read only the few bytes they need (the packed
quant-state JSON of each quantized weight). No torch import.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from qconv.errors import QconvError
from qconv.format import INDEX_NAME, SINGLE_SHARD_NAME, safe_join

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
#: safetensors dtype names of the torch dtypes qconv writes or reads.
TORCH_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "uint8": "U8", "float64": "F64"}
_MAX_HEADER = 100 << 20  # safetensors itself refuses headers above 100 MB


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its file's header describes it."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "U8", ...
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offsets of the data in ``file``
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def read_bytes(self) -> bytes:
        with open(self.file, "rb") as f:
            f.seek(self.start)
            return f.read(self.nbytes)


def read_header(path: Path) -> tuple[dict[str, TensorHeader], dict[str, str]]:
    """Tensors and ``__metadata__`` of one safetensors file; QconvError when the header is not valid."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise QconvError(f"{path.name}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, _MAX_HEADER):
            raise QconvError(f"{path.name}: safetensors header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QconvError(f"{path.name}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise QconvError(f"{path.name}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    tensors: dict[str, TensorHeader] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise QconvError(f"{path.name}: tensor {name!r} has a malformed header entry") from exc
        t = TensorHeader(name, dtype, shape, path, base + int(begin), base + int(end))
        if dtype not in DTYPE_BYTES:
            raise QconvError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        if t.end > size or t.start > t.end or t.nbytes != t.numel * DTYPE_BYTES[dtype]:
            raise QconvError(f"{path.name}: tensor {name!r} byte range does not match its shape or the file size")
        tensors[name] = t
    return tensors, metadata


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, else ``model.safetensors``, else any."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        names = sorted(set(read_index(directory).values()))
        return [safe_join(directory, n) for n in names]
    single = directory / SINGLE_SHARD_NAME
    if single.is_file():
        return [single]
    return sorted(directory.glob("*.safetensors"))


def read_index(directory: Path) -> dict[str, str]:
    """``weight_map`` of ``model.safetensors.index.json`` (tensor name -> shard file name)."""
    path = Path(directory) / INDEX_NAME
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise QconvError(f"{path}: not a readable safetensors index ({exc})") from exc
    if not isinstance(weight_map, dict):
        raise QconvError(f"{path}: weight_map is not an object")
    return weight_map


def read_all_headers(directory: Path) -> dict[str, TensorHeader]:
    """Every tensor of the checkpoint in ``directory``; QconvError on a name stored twice or a bad header."""
    out: dict[str, TensorHeader] = {}
    for path in weight_files(directory):
        if not path.is_file():
            raise QconvError(f"{path.name}: listed in {INDEX_NAME} but missing")
        tensors, _ = read_header(path)
        for name, t in tensors.items():
            if name in out:
                raise QconvError(f"tensor {name!r} is stored twice ({out[name].file.name} and {path.name})")
            out[name] = t
    return out


def read_state_json(header: TensorHeader) -> dict:
    """The packed quant-state JSON stored in a ``quant_state.bitsandbytes__*`` tensor (raises on bad bytes)."""
    return json.loads(header.read_bytes().decode("utf-8"))
