"""Find a checkpoint's files: resolve a Hub id or directory, list shards, read config and manifest, verify.

Only the standard library (and ``qconv.format``, ``qconv.hub``, ``qconv.safetensors_header``) is used
here, so all of it runs before torch or transformers are imported.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qconv import format as fmt
from qconv.errors import QconvError
from qconv.safetensors_header import index_shards

logger = logging.getLogger(__name__)

#: What a load needs from a Hub repo (weights, configs, tokenizer files); remote code only when asked.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class Checkpoint:
    """A resolved checkpoint directory and what was read from it without heavy imports."""

    directory: Path
    config: dict[str, Any]
    shards: list[Path]
    manifest: fmt.Manifest | None
    revision: str = ""
    source: str = ""


def resolve_directory(
    name_or_path: str | os.PathLike, *, revision: str | None, token: str | None, trust_remote_code: bool
) -> tuple[Path, str]:
    """A local directory as is, or a Hub id downloaded into the HF cache; returns ``(directory, commit)``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision:
            logger.warning("revision=%r ignored: %s is a local directory", revision, path)
        return path, ""
    if path.exists():
        raise QconvError(f"{path}: not a directory (pass the checkpoint folder or a Hub id)")
    from qconv.hub import download_snapshot, looks_like_repo_id

    if not looks_like_repo_id(str(name_or_path)):
        raise QconvError(f"{name_or_path}: no such directory, and not a Hub repo id (namespace/name)")
    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    folder, commit = download_snapshot(str(name_or_path), revision=revision, token=token, allow_patterns=patterns)
    return folder, commit


def list_shards(directory: Path) -> list[Path]:
    """Shard files from the index (checked to stay inside ``directory``) or the single ``model.safetensors``."""
    index = directory / fmt.INDEX_NAME
    single = directory / fmt.SINGLE_SHARD_NAME
    if index.is_file():
        return index_shards(directory)
    if single.is_file():
        return [single]
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.safetensors"))
    hint = f" (found {', '.join(others[:3])})" if others else ""
    raise QconvError(
        f"{directory}: no {fmt.SINGLE_SHARD_NAME} or {fmt.INDEX_NAME}{hint}; "
        f"convert the model first: qconv convert <source> <out_dir>"
    )


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / fmt.CONFIG_NAME
    if not path.is_file():
        raise QconvError(f"{directory}: no {fmt.CONFIG_NAME}, so it is not a Hugging Face model checkpoint")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QconvError(f"{path}: not readable JSON ({exc})") from exc


def open_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> Checkpoint:
    """Resolve, then read config and manifest and list shards (no hashing, no tensor bytes)."""
    directory, commit = resolve_directory(name_or_path, revision=revision, token=token, trust_remote_code=trust_remote_code)
    config = read_config(directory)
    manifest = fmt.read_manifest(directory)  # refuses a newer schema
    qc = config.get("quantization_config")
    if not qc:
        raise QconvError(
            f"{directory}: config.json has no quantization_config, so the weights are not pre-quantized; "
            f"convert them first: qconv convert {name_or_path} <out_dir>"
        )
    fmt.settings_from_quantization_config(qc)  # QconvError unless bitsandbytes 4-bit
    shards = list_shards(directory)
    return Checkpoint(directory=directory, config=config, shards=shards, manifest=manifest, revision=commit, source=str(name_or_path))


def verify_files(ckpt: Checkpoint) -> None:
    """Check every file the manifest lists against its sha256; :class:`QconvError` on the first mismatch."""
    if ckpt.manifest is None:
        raise QconvError(f"{ckpt.directory}: verify=True needs {fmt.MANIFEST_NAME}, and this checkpoint has none")
    for check in fmt.check_manifest_files(ckpt.directory, ckpt.manifest):
        if check.path is None:
            raise QconvError(check.problem)
        if check.problem == "missing":
            raise QconvError(f"{check.path}: listed in {fmt.MANIFEST_NAME} but missing")
        if check.problem == "sha256":
            raise QconvError(f"{check.path}: sha256 mismatch (manifest {check.expected[:12]}..., file "
                             f"{check.actual[:12]}...); re-download or re-convert")
    logger.info("verified %d files against %s", len(ckpt.manifest.files), fmt.MANIFEST_NAME)
