"""Parse safetensors headers (and the shard index) without loading tensor data; shared by converter and runtime.

A safetensors file is an 8-byte little-endian header length, a JSON object ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the tensor data. :func:`read_header`
checks what ``safetensors`` itself checks (header length within the file and under 100 MB, valid UTF-8
JSON, well-formed entries, ``nbytes == numel * itemsize``, tensors packed back to back up to the end of
the file) and turns every failure into a one-line :class:`QconvError` naming the file and tensor.
No torch import here: :func:`torch_dtype` imports it when called.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from qconv.errors import QconvError
from qconv.format import INDEX_NAME, SINGLE_SHARD_NAME, safe_join

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: safetensors dtype name -> (bytes per element, torch dtype attribute name)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"), "U8": (1, "uint8"),
    "BOOL": (1, "bool"), "U16": (2, "uint16"), "U32": (4, "uint32"), "U64": (8, "uint64"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "C64": (8, "complex64"),
}
#: torch dtype attribute name ("bfloat16") -> safetensors dtype name ("BF16")
SAFETENSORS_DTYPE_OF_TORCH: dict[str, str] = {torch_name: st for st, (_, torch_name) in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # safetensors itself refuses larger headers


def itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype name (KeyError when unsupported)."""
    return DTYPES[dtype][0]


def torch_dtype(dtype: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype name; QconvError when qconv or this torch lacks it."""
    import torch

    if dtype not in DTYPES or not hasattr(torch, DTYPES[dtype][1]):
        raise QconvError(f"safetensors dtype {dtype!r} is not supported (torch {torch.__version__})")
    return getattr(torch, DTYPES[dtype][1])


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its file's header describes it: dtype, shape and absolute byte range in ``file``."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "U8", ...
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def torch_dtype(self) -> "torch.dtype":
        return torch_dtype(self.dtype)

    def read_bytes(self) -> bytes:
        """The tensor's raw bytes (for small tensors: packed quant-state JSON and the like)."""
        with open(self.file, "rb") as f:
            f.seek(self.start)
            data = f.read(self.nbytes)
        if len(data) != self.nbytes:
            raise QconvError(f"{self.file}: unexpected end of file in tensor {self.name!r} (truncated?)")
        return data


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one ``.safetensors`` file."""

    path: Path
    data_start: int  # absolute offset of the data section (8 + header length)
    size: int  # file size in bytes
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Parse and validate the header of a safetensors file; :class:`QconvError` when it is not valid."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise QconvError(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise QconvError(
                    f"{path}: corrupt safetensors header (length {n} exceeds the {size}-byte file or the 100 MB cap)"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError as exc:
        raise QconvError(f"{path}: safetensors file is missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QconvError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise QconvError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QconvError(f"{path}: safetensors __metadata__ is not an object of strings")
    data_start = 8 + n
    tensors = {name: _entry(path, name, info, data_start, size) for name, info in header.items()}
    _check_packed(path, tensors.values(), data_start, size)
    return ShardHeader(path=path, data_start=data_start, size=size, tensors=tensors, metadata=metadata)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: Path, name: str, info: Any, data_start: int, size: int) -> TensorEntry:
    ok = (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and isinstance(info.get("shape"), list)
        and all(_is_int(d) for d in info["shape"])
        and isinstance(info.get("data_offsets"), list)
        and len(info["data_offsets"]) == 2
        and all(_is_int(o) for o in info["data_offsets"])
    )
    if not ok:
        raise QconvError(f"{path}: tensor {name!r} has a malformed header entry (dtype, shape, data_offsets)")
    dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    if dtype not in DTYPES:
        raise QconvError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise QconvError(f"{path}: tensor {name!r} has a negative dimension {list(shape)}")
    entry = TensorEntry(name, dtype, shape, path, data_start + b, data_start + e)
    if not (0 <= b <= e and entry.end <= size and entry.nbytes == entry.numel * itemsize(dtype)):
        raise QconvError(
            f"{path}: tensor {name!r} has byte range [{b}, {e}) that does not fit its shape {list(shape)} "
            f"({dtype}) or the file ({size - data_start} data bytes)"
        )
    return entry


def _check_packed(path: Path, entries: Iterable[TensorEntry], data_start: int, size: int) -> None:
    """Tensors must be back to back from the start of the data section to the end of the file."""
    pos = data_start
    for entry in sorted(entries, key=lambda t: (t.start, t.end)):
        if entry.start != pos:
            what = "overlaps the previous tensor" if entry.start < pos else "leaves a gap before it"
            raise QconvError(f"{path}: tensor {entry.name!r} {what} (data offset {entry.start - data_start}, "
                             f"expected {pos - data_start})")
        pos = entry.end
    if pos != size:
        raise QconvError(f"{path}: {size - pos} bytes after the last tensor (corrupt safetensors file)")


def read_index(directory: str | os.PathLike, index_name: str = INDEX_NAME) -> dict[str, Path]:
    """``weight_map`` of the index ``index_name`` (default ``model.safetensors.index.json``; the same layout
    serves ``pytorch_model.bin.index.json``): tensor name -> shard path inside ``directory``.

    Every shard path goes through :func:`qconv.format.safe_join`; QconvError for an unreadable index, an
    empty or malformed weight map, or a listed shard that does not exist.
    """
    directory = Path(directory)
    path = directory / index_name
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QconvError(f"{path}: not a readable JSON index ({exc})") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise QconvError(f"{path}: no 'weight_map' object in the index")
    out: dict[str, Path] = {}
    for name, rel in weight_map.items():
        if not isinstance(rel, str):
            raise QconvError(f"{path}: weight_map[{name!r}] is not a file name")
        out[name] = safe_join(directory, rel)
    missing = sorted({p.name for p in out.values() if not p.is_file()})
    if missing:
        raise QconvError(
            f"{directory}: shard {missing[0]} listed in {index_name} is missing (the file does not exist)"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return out


def index_shards(directory: str | os.PathLike) -> list[Path]:
    """The distinct shard files the index lists, sorted (see :func:`read_index`)."""
    return sorted(set(read_index(directory).values()))


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, else ``model.safetensors``, else any."""
    directory = Path(directory)
    if (directory / INDEX_NAME).is_file():
        return index_shards(directory)
    single = directory / SINGLE_SHARD_NAME
    if single.is_file():
        return [single]
    return sorted(directory.glob("*.safetensors"))


def merge_tensors(headers: Iterable[ShardHeader]) -> dict[str, TensorEntry]:
    """Every tensor of several shards by name; QconvError when a name is stored twice."""
    out: dict[str, TensorEntry] = {}
    for header in headers:
        for name, entry in header.tensors.items():
            if name in out:
                raise QconvError(f"tensor {name!r} is stored twice ({out[name].file.name} and {header.path.name})")
            out[name] = entry
    return out


def read_all_headers(directory: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in ``directory`` (see :func:`weight_files`, :func:`merge_tensors`)."""
    return merge_tensors(read_header(p) for p in weight_files(directory))
