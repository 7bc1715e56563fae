"""Resolve the SOURCE argument of ``qconv convert``: a local checkpoint directory, a Hub repo id, or a ``.gguf`` file.

Every kind ends as a :class:`Source`: a directory holding ``config.json`` (and tokenizer files when the
source has them), a streaming :class:`~qconv.converter.checkpoint.Checkpoint`, and the identity recorded
in the manifest (``kind``, ``id``, ``revision`` or content ``sha256``). A GGUF file is the exception to
streaming: transformers dequantizes the whole model into memory (fp32), which is fine for the small
models GGUF is used for here, and documented.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qconv.converter.checkpoint import Checkpoint, memory_checkpoint, open_checkpoint
from qconv.errors import QconvError
from qconv.converter.source_hash import ContentHash, start_content_hash
from qconv.format import CONFIG_NAME, SOURCE_TREE_HASH, sha256_file

logger = logging.getLogger(__name__)

#: What is fetched from the Hub: configs, tokenizer files, the card, and safetensors weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
HUB_BIN_PATTERNS = ["pytorch_model*.bin"]


@dataclass
class Source:
    """A resolved source: where its files are, how to read its tensors, and its identity."""

    kind: str  # "dir" | "hub" | "gguf"
    id: str
    directory: Path  # config.json + tokenizer files (a temp dir for GGUF)
    checkpoint: Checkpoint
    config: dict[str, Any]
    revision: str | None = None
    card_text: str | None = None
    _hash: Future | None = None
    _cleanup: list[Path] = field(default_factory=list)
    _pool: ThreadPoolExecutor | ContentHash | None = None

    def identity(self) -> dict[str, Any]:
        """The manifest's ``source`` entry (waits for the content hash of a local directory)."""
        ident: dict[str, Any] = {"kind": self.kind, "id": self.id, "revision": self.revision, "sha256": None}
        if self._hash is not None:
            ident["sha256"], ident["files"], tree_files = self._hash.result()
            if tree_files:
                ident["tree_hash"] = {"scheme": SOURCE_TREE_HASH, "files": tree_files}
        return ident

    def close(self) -> None:
        self.checkpoint.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for path in self._cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_source(source: str | Path, *, revision: str | None = None, token: str | None = None,
                   hash_content: bool = True) -> Source:
    """Turn ``source`` into a :class:`Source`, raising :class:`QconvError` when it cannot be used."""
    text = str(source)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise QconvError(f"{text}: GGUF file not found")
        return _gguf_source(path)
    if path.is_dir():
        src = _dir_source(path, kind="dir", ident=str(path.resolve()), revision=None)
        if hash_content:
            src._pool, src._hash = _start_content_hash(src)
        return src
    if path.exists():
        raise QconvError(f"{text}: not a checkpoint directory or a .gguf file")
    from qconv.hub import download_snapshot, looks_like_repo_id

    if not looks_like_repo_id(text):
        raise QconvError(f"{text}: source not found (no such directory or .gguf file, and not a Hub repo id 'owner/name')")
    folder, commit = download_snapshot(text, revision=revision, token=token, allow_patterns=HUB_PATTERNS)
    if not any(folder.glob("*.safetensors")):
        folder, commit = download_snapshot(text, revision=commit or revision, token=token,
                                           allow_patterns=HUB_PATTERNS + HUB_BIN_PATTERNS)
    return _dir_source(folder, kind="hub", ident=text, revision=commit or revision)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise QconvError(f"{directory}: no {CONFIG_NAME}, so this is not a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QconvError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise QconvError(f"{path}: expected a JSON object")
    return config


def _card_text(directory: Path) -> str | None:
    card = directory / "README.md"
    try:
        return card.read_text(encoding="utf-8") if card.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _dir_source(directory: Path, *, kind: str, ident: str, revision: str | None) -> Source:
    config = _read_config(directory)
    checkpoint = open_checkpoint(directory)
    return Source(kind=kind, id=ident, directory=directory, checkpoint=checkpoint, config=config,
                  revision=revision, card_text=_card_text(directory))


def _start_content_hash(src: Source) -> tuple[ContentHash, Future]:
    """Hash the directory on background threads while the conversion runs: safetensors weights as tree
    digests (pieces hashed in parallel, see :mod:`qconv.converter.source_hash`), other files plainly."""
    ckpt = src.checkpoint
    layouts = {p: ckpt.layouts[p] for p in ckpt.files if p.parent == src.directory} if ckpt.kind == "safetensors" else {}
    return start_content_hash(src.directory, layouts)


def _gguf_source(path: Path) -> Source:
    """Dequantize a GGUF file with transformers (whole model in memory), keep its state dict and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("loading %s through transformers' GGUF support (not streaming: the model is held in memory)", path)
    folder, name = str(path.parent.resolve()), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, device_map="cpu")
    except (ImportError, ValueError, OSError, KeyError, RuntimeError) as exc:
        raise QconvError(f"{path}: transformers could not load this GGUF file ({_one_line(exc)})") from exc
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    if not config.get("architectures"):  # GGUF configs lack it; the Hub and pipelines read it
        config["architectures"] = [type(model).__name__]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    del model
    workdir = Path(tempfile.mkdtemp(prefix="qconv-gguf-"))
    try:
        try:
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(workdir)
        except Exception as exc:  # a GGUF without a usable tokenizer still converts
            logger.warning("%s: no tokenizer could be read from the GGUF file (%s)", path, _one_line(exc))
        # written after the tokenizer, whose save may leave a config.json of its own
        (workdir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    src = Source(kind="gguf", id=path.name, directory=workdir, checkpoint=memory_checkpoint(state), config=config,
                 revision=None, _cleanup=[workdir])
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qconv-hash")
    src._pool = pool
    src._hash = pool.submit(_hash_one, path)
    return src


def _hash_one(path: Path) -> tuple[str, dict[str, str], list[str]]:
    digest = sha256_file(path)
    return digest, {path.name: digest}, []


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
