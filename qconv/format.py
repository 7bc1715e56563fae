"""The qconv on-disk format: the single source of truth shared by the converter and the runtime.

A qconv checkpoint is a Hugging Face bitsandbytes 4-bit checkpoint (what ``transformers`` writes for a
model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``) plus ``qconv_manifest.json``. This module
names every tensor and file, packs and unpacks the per-Linear quant state, builds ``config.json``'s
``quantization_config``, and defines, reads and writes the manifest. ``docs/format.md`` is its prose twin.

Heavy imports (torch, bitsandbytes, transformers) are deferred to the functions that need them, so that
``qconv --help`` and manifest reading stay fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from qconv.errors import QconvError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from bitsandbytes.functional import QuantState

# --------------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------------
MANIFEST_NAME = "qconv_manifest.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
CARD_NAME = "README.md"
SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}


def shard_name(index: int, total: int) -> str:
    """Name of shard ``index`` (1-based) of ``total``; a single shard is ``model.safetensors``."""
    if total == 1:
        return SINGLE_SHARD_NAME
    return f"model-{index:05d}-of-{total:05d}.safetensors"


# --------------------------------------------------------------------------------------------------
# Quantization settings and tensor names
# --------------------------------------------------------------------------------------------------
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
QUANT_STORAGES = ("uint8", "bfloat16", "float16", "float32")
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed blocksize for double-quantized absmax

#: Suffixes, after ``<linear>.weight.``, of the tensors that carry a quantized Linear's state.
ABSMAX = "absmax"
QUANT_MAP = "quant_map"
NESTED_ABSMAX = "nested_absmax"
NESTED_QUANT_MAP = "nested_quant_map"
PACKED_STATE_PREFIX = "quant_state.bitsandbytes__"  # + quant_type; a UTF-8 JSON in a uint8 tensor


def packed_state_suffix(quant_type: str) -> str:
    """``quant_state.bitsandbytes__nf4`` or ``..._fp4``."""
    return PACKED_STATE_PREFIX + quant_type


def state_suffixes(quant_type: str, double_quant: bool) -> tuple[str, ...]:
    """Suffixes (after ``<weight>.``) a quantized weight must have, in the order bitsandbytes emits."""
    base = (ABSMAX, QUANT_MAP)
    nested = (NESTED_ABSMAX, NESTED_QUANT_MAP) if double_quant else ()
    return base + nested + (packed_state_suffix(quant_type),)


@dataclass(frozen=True)
class QuantSettings:
    """How weights are quantized; mirrors ``transformers.BitsAndBytesConfig``'s 4-bit fields."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    skip_modules: tuple[str, ...] = ()

    def validate(self) -> "QuantSettings":
        """Raise :class:`QconvError` naming the option when a value is not supported."""
        if self.quant_type not in QUANT_TYPES:
            raise QconvError(f"--quant-type: unsupported value {self.quant_type!r} (choose from {', '.join(QUANT_TYPES)})")
        if self.blocksize not in BLOCKSIZES:
            raise QconvError(
                f"--blocksize: unsupported value {self.blocksize} (bitsandbytes accepts {', '.join(map(str, BLOCKSIZES))})"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise QconvError(
                f"--compute-dtype: unsupported dtype {self.compute_dtype!r} (choose from {', '.join(COMPUTE_DTYPES)})"
            )
        if self.quant_storage not in QUANT_STORAGES:
            raise QconvError(
                f"--quant-storage: unsupported dtype {self.quant_storage!r} (choose from {', '.join(QUANT_STORAGES)})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["skip_modules"] = tuple(kw.get("skip_modules") or ())
        return cls(**kw)

    def bnb_config(self):
        """The equivalent ``transformers.BitsAndBytesConfig``."""
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage),
            llm_int8_skip_modules=list(self.skip_modules) or None,
        )


def quantization_config(settings: QuantSettings) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` entry, exactly as transformers serializes it."""
    return settings.bnb_config().to_dict()


def settings_from_quantization_config(qc: Mapping[str, Any]) -> QuantSettings:
    """Read a ``quantization_config`` (ours or any bnb 4-bit writer's) back into :class:`QuantSettings`."""
    if qc.get("quant_method") != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise QconvError(f"quantization_config is not bitsandbytes 4-bit: {dict(qc)!r}")
    return QuantSettings(
        quant_type=qc.get("bnb_4bit_quant_type", "fp4"),
        blocksize=64,  # not stored in the config: each tensor's packed state carries its own
        double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=_dtype_name(qc.get("bnb_4bit_compute_dtype") or "float32"),
        quant_storage=_dtype_name(qc.get("bnb_4bit_quant_storage") or "uint8"),
        skip_modules=tuple(qc.get("llm_int8_skip_modules") or ()),
    )


def _dtype_name(value: Any) -> str:
    return str(value).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Quant-state packing (what each quantized Linear stores next to its packed weight)
# --------------------------------------------------------------------------------------------------
def pack_quant_state(weight_name: str, packed_weight: "torch.Tensor", quant_state: "QuantState") -> dict[str, "torch.Tensor"]:
    """Tensors to write for one quantized weight, keyed by their full names.

    ``weight_name`` is the parameter name (``model.layers.0.mlp.down_proj.weight``). The layout is
    bitsandbytes' own ``QuantState.as_dict(packed=True)``, so the result is what transformers writes.
    """
    out = {weight_name: packed_weight}
    for suffix, tensor in quant_state.as_dict(packed=True).items():
        out[f"{weight_name}.{suffix}"] = tensor
    return out


def unpack_quant_state(weight_name: str, tensors: Mapping[str, "torch.Tensor"], device: "torch.device | str" = "cpu") -> "QuantState":
    """Rebuild the ``QuantState`` of ``weight_name`` from its stored tensors (any mapping of full names)."""
    from bitsandbytes.functional import QuantState

    prefix = weight_name + "."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not any(k.startswith(PACKED_STATE_PREFIX) for k in state):
        raise QconvError(f"{weight_name}: no {PACKED_STATE_PREFIX}* tensor, so it is not a bnb 4-bit weight")
    return QuantState.from_dict(state, device=device)


def read_packed_state_json(tensor: "torch.Tensor") -> dict[str, Any]:
    """Decode a ``quant_state.bitsandbytes__*`` tensor (UTF-8 JSON bytes) into a dict."""
    return json.loads(bytes(tensor.cpu().numpy().tobytes()).decode("utf-8"))


def quantized_weight_names(keys: Iterable[str]) -> dict[str, str]:
    """Map each quantized weight name found in ``keys`` to its quant type (``nf4``/``fp4``)."""
    found: dict[str, str] = {}
    for key in keys:
        head, sep, tail = key.rpartition("." + PACKED_STATE_PREFIX)
        if sep:
            found[head] = tail
    return found


def state_tensor_names(weight_name: str, quant_type: str, double_quant: bool) -> list[str]:
    """Full names of the companion tensors a quantized weight must have."""
    return [f"{weight_name}.{s}" for s in state_suffixes(quant_type, double_quant)]


def is_state_tensor(key: str) -> bool:
    """True for the companion tensors (absmax, maps, packed json), False for weights and other tensors."""
    last = key.rsplit(".", 1)[-1]
    return last in (ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP) or ("." + PACKED_STATE_PREFIX) in key


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------
MANIFEST_SCHEMA_VERSION = 1
FORMAT_NAME = "bnb-4bit"


@dataclass
class TokenizerFix:
    """One change (or finding) the converter made to the tokenizer/config, replayed by the runtime."""

    kind: str  # e.g. "pad_token", "padding_side", "chat_template", "bos", "untrained_rows"
    detail: str  # a sentence for people
    before: Any = None
    after: Any = None
    applied: bool = True  # False: recorded only (a finding, nothing changed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Manifest:
    """``qconv_manifest.json``: what was converted, how, and the sha256 of every written file."""

    source: dict[str, Any]  # {"id": ..., "revision": ... | None, "sha256": ... | None, "kind": "dir|hub|gguf"}
    settings: dict[str, Any]  # QuantSettings.to_dict()
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 hex
    tokenizer_fixes: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # params, bytes before/after, quantized/kept counts
    schema_version: int = MANIFEST_SCHEMA_VERSION
    format: str = FORMAT_NAME
    qconv_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def quant_settings(self) -> QuantSettings:
        return QuantSettings.from_dict(self.settings)


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``qconv_manifest.json`` (sorted keys, 2-space indent, trailing newline)."""
    from qconv import __version__

    if not manifest.qconv_version:
        manifest.qconv_version = __version__
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest | None:
    """Read the manifest of a checkpoint directory; None when there is none (e.g. another tool wrote it).

    Refuses a manifest written by a newer schema than this qconv understands.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QconvError(f"{path}: not a readable JSON manifest ({exc})") from exc
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise QconvError(f"{path}: manifest has no integer schema_version")
    if version > MANIFEST_SCHEMA_VERSION:
        raise QconvError(
            f"{path}: manifest schema version {version} is newer than this qconv understands "
            f"({MANIFEST_SCHEMA_VERSION}); upgrade qconv (pip install -U qconv)"
        )
    return Manifest.from_dict(data)


def sha256_file(path: str | os.PathLike, chunk: int = 4 << 20) -> str:
    """Hex sha256 of a file, read through one reused 4 MiB buffer (flat memory, also beside a conversion)."""
    h = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """One manifest entry checked against the disk: ``problem`` is None when the file has its sha256."""

    rel: str
    path: Path | None  # None when the listed name points outside the directory
    expected: str
    actual: str | None = None  # None when missing or unsafe
    problem: str | None = None  # "missing" | "sha256" | the unsafe-path message


def check_manifest_files(directory: str | os.PathLike, manifest: "Manifest") -> list[FileCheck]:
    """Hash every file ``manifest`` lists (several files at once: sha256 runs at ~1 GB/s per core), in name
    order. Names are joined with :func:`safe_join`; an escaping name is reported, never read."""
    from concurrent.futures import ThreadPoolExecutor

    directory = Path(directory)
    entries: list[tuple[str, Path | None, str, str | None]] = []
    for rel, expected in sorted(manifest.files.items()):
        try:
            entries.append((rel, safe_join(directory, rel), expected, None))
        except QconvError as exc:
            entries.append((rel, None, expected, str(exc)))

    def check(entry: tuple[str, Path | None, str, str | None]) -> FileCheck:
        rel, path, expected, unsafe = entry
        if path is None:
            return FileCheck(rel, None, expected, problem=unsafe)
        if not path.is_file():
            return FileCheck(rel, path, expected, problem="missing")
        actual = sha256_file(path)
        return FileCheck(rel, path, expected, actual, None if actual == expected else "sha256")

    workers = max(1, min(8, len(entries), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qconv-verify") as pool:
        return list(pool.map(check, entries))


#: Piece size of the safetensors tree digest of a source weight file (docs/format.md §6.1).
SOURCE_TREE_PIECE = 16 << 20
#: Name of that digest, recorded in the manifest's ``source.tree_hash``.
SOURCE_TREE_HASH = "sha256-safetensors-tree-16MiB"


def tree_digest(header_digest: bytes, piece_digests: Iterable[bytes]) -> str:
    """Hex sha256 over a header's raw sha256 followed by each data piece's raw sha256, in file order."""
    h = hashlib.sha256(header_digest)
    for d in piece_digests:
        h.update(d)
    return h.hexdigest()


def safetensors_tree_sha256(path: str | os.PathLike) -> str:
    """The tree digest of a safetensors file (reference implementation, reads the whole file).

    Header = the first ``8 + N`` bytes; pieces = each tensor's data, tensors in data-offset order, cut every
    ``SOURCE_TREE_PIECE`` bytes from the tensor's start (an empty tensor has none). The digest is
    ``sha256(sha256(header) || sha256(piece_1) || ...)``, so pieces can be hashed in parallel as they are read.
    """
    from qconv.safetensors_header import read_header  # it imports this module

    header = read_header(path)
    pieces = []
    with open(path, "rb") as f:
        header_bytes = f.read(header.data_start)
        for entry in sorted(header.tensors.values(), key=lambda e: e.start):
            for a in range(entry.start, entry.end, SOURCE_TREE_PIECE):
                f.seek(a)
                pieces.append(hashlib.sha256(f.read(min(entry.end, a + SOURCE_TREE_PIECE) - a)).digest())
    return tree_digest(hashlib.sha256(header_bytes).digest(), pieces)


def cache_key(source_revision: str, settings: QuantSettings) -> str:
    """Key under which a conversion is reproducible: source revision + settings + format version."""
    blob = json.dumps(
        {"revision": source_revision, "settings": settings.to_dict(), "schema": MANIFEST_SCHEMA_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def safe_join(root: str | os.PathLike, relative: str) -> Path:
    """Join a path read from a checkpoint (index, manifest) to its directory, refusing escapes.

    The check is lexical (``..`` and absolute paths), so files that are symlinks, as in the Hugging Face
    cache where each snapshot file links to ``../../blobs/<hash>``, are accepted.
    """
    root_path = Path(root).resolve()
    candidate = Path(os.path.normpath(root_path / relative))
    if Path(relative).is_absolute() or (candidate != root_path and root_path not in candidate.parents):
        raise QconvError(f"{root}: path {relative!r} points outside the checkpoint directory")
    return candidate
