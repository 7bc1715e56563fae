"""Hugging Face Hub download helpers shared by the converter and the runtime (upload lives in converter/push.py).

Everything goes through ``huggingface_hub.snapshot_download``, so the normal HF cache, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and tokens work as users expect. ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when a
function is called (not only when huggingface_hub was imported). Failures become one-line
:class:`~qconv.errors.QconvError` messages; a token never appears in a message or a log line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from qconv.errors import QconvError

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


def looks_like_repo_id(s: str) -> bool:
    """True for ``namespace/name`` strings that are not an existing local path or a file name like ``x.gguf``.

    A repo id needs exactly one ``/`` (bare legacy names such as ``gpt2`` are not accepted: pass
    ``openai-community/gpt2``), so a mistyped local directory is not silently looked up on the Hub.
    """
    s = str(s)
    if not _REPO_ID.match(s) or ".." in s or s.endswith((".gguf", ".safetensors", ".bin", ".json")):
        return False
    return not Path(s).expanduser().exists()


def hub_offline() -> bool:
    """Whether Hub access is disabled (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` read now)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().lower() in _TRUE
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        return False


def download_snapshot(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_patterns: list[str] | str | None = None,
) -> tuple[Path, str]:
    """Download (or find in the HF cache) a model repo snapshot; return ``(local folder, commit sha)``.

    Offline (``HF_HUB_OFFLINE=1``) only the local cache is used. Not-found, gated, auth, offline and
    connection errors are turned into :class:`QconvError` naming the repo (and revision).
    """
    from huggingface_hub import snapshot_download

    where = f"{repo_id}@{revision}" if revision else repo_id
    offline = hub_offline()
    kwargs = dict(repo_id=repo_id, revision=revision, token=token, allow_patterns=allow_patterns)
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        kwargs["endpoint"] = endpoint.rstrip("/")
    try:
        folder = snapshot_download(local_files_only=offline, **kwargs)
    except Exception as exc:  # mapped below; anything unknown is re-raised untouched
        raise _as_qconv_error(exc, where, offline, token) from exc
    path = Path(folder)
    commit = path.name if _COMMIT.match(path.name) else (revision or "")
    logger.info("hub: %s -> %s (commit %s)", where, path, commit or "unknown")
    return path, commit


def _as_qconv_error(exc: Exception, where: str, offline: bool, token: str | None) -> Exception:
    """Map a huggingface_hub exception to a one-line QconvError (or return ``exc`` when it is unknown)."""
    from huggingface_hub import errors as hf_errors

    def is_a(name: str) -> bool:
        cls = getattr(hf_errors, name, None)
        return cls is not None and isinstance(exc, cls)

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if is_a("GatedRepoError"):
        msg = f"{where}: the repository is gated; accept its terms on the Hub and pass --token (or HF_TOKEN)"
    elif is_a("RevisionNotFoundError"):
        msg = f"{where}: revision not found on the Hub (check --revision)"
    elif is_a("RepositoryNotFoundError"):
        msg = f"{where}: repository not found on the Hub (if it is private, pass --token or set HF_TOKEN)"
    elif is_a("HFValidationError"):
        msg = f"{where}: not a valid Hub repo id ({_first_line(exc)})"
    elif status in (401, 403):
        msg = f"{where}: the Hub refused access (HTTP {status}); check --token / HF_TOKEN"
    elif is_a("LocalEntryNotFoundError") or isinstance(exc, FileNotFoundError):
        if offline:
            msg = f"{where}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set (unset it to download)"
        else:
            msg = f"{where}: could not reach the Hub and no cached copy exists ({_first_line(exc)})"
    elif is_a("HfHubHTTPError") or isinstance(exc, (OSError, ConnectionError)):
        msg = f"{where}: download failed ({_first_line(exc)})"
    else:
        return exc
    if token:
        msg = msg.replace(token, "***")
    return QconvError(msg)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
