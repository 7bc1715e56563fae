"""The model zoo: rebuild each ``scripts/zoo.yaml`` entry whose source or settings changed.

For every entry: resolve the source's current commit, compute ``format.cache_key(commit, settings)``,
compare it with the key recomputed from the target repo's ``qconv_manifest.json`` (source revision,
settings, schema version), and skip when equal; otherwise convert, verify and push. A failing entry
does not stop the others. ``scripts/rebuild_zoo.py`` is the command line around :func:`rebuild_zoo`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qconv.errors import QconvError
from qconv.format import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, QuantSettings, cache_key, read_manifest

logger = logging.getLogger(__name__)

_ENTRY_KEYS = {"name", "source", "revision", "settings", "target"}


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: a Hub source (followed at ``revision``, default ``main``) and its target repo."""

    name: str
    source: str
    target: str
    revision: str | None = None
    settings: QuantSettings = field(default_factory=QuantSettings)


@dataclass
class ZooResult:
    name: str
    action: str  # "skipped" | "converted" | "would convert" | "failed"
    source_revision: str | None = None
    detail: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.action == "failed"


def load_zoo(path: str | Path) -> list[ZooEntry]:
    """Read and check ``zoo.yaml``: ``models:`` is a list of entries with unique names."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise QconvError(f"{path}: cannot read the zoo file ({exc})") from exc
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not models:
        raise QconvError(f"{path}: expected a non-empty list under 'models:'")
    entries, seen = [], set()
    for i, raw in enumerate(models):
        where = f"{path}: models[{i}]"
        if not isinstance(raw, dict):
            raise QconvError(f"{where}: expected a mapping")
        unknown = set(raw) - _ENTRY_KEYS
        missing = {"name", "source", "target"} - set(raw)
        if unknown or missing:
            raise QconvError(f"{where}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}")
        settings_raw = raw.get("settings") or {}
        bad = set(settings_raw) - set(QuantSettings().to_dict())
        if bad:
            raise QconvError(f"{where}.settings: unknown keys {sorted(bad)}")
        settings = QuantSettings.from_dict(settings_raw).validate()
        entry = ZooEntry(str(raw["name"]), str(raw["source"]), str(raw["target"]),
                         str(raw["revision"]) if raw.get("revision") else None, settings)
        if entry.name in seen:
            raise QconvError(f"{where}: duplicate name {entry.name!r}")
        seen.add(entry.name)
        entries.append(entry)
    return entries


def remote_cache_key(api: Any, repo_id: str) -> str | None:
    """The cache key of the conversion stored in ``repo_id`` (None: no repo, no manifest, other schema)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    with tempfile.TemporaryDirectory(prefix="qconv-zoo-") as tmp:
        try:
            api.hf_hub_download(repo_id, MANIFEST_NAME, local_dir=tmp)
        except (RepositoryNotFoundError, EntryNotFoundError):
            return None
        manifest = read_manifest(tmp)
    revision = (manifest.source or {}).get("revision") if manifest else None
    if manifest is None or not revision or manifest.schema_version != MANIFEST_SCHEMA_VERSION:
        return None
    return cache_key(revision, manifest.quant_settings)


def rebuild_entry(entry: ZooEntry, *, api: Any, token: str | None, work_dir: Path, dry_run: bool = False,
                  force: bool = False, keep: bool = False) -> ZooResult:
    """Skip, or convert + verify + push one entry; raises on failure (the caller records it)."""
    result = ZooResult(entry.name, "failed")
    result.source_revision = api.model_info(entry.source, revision=entry.revision).sha
    key = cache_key(result.source_revision, entry.settings)
    remote = remote_cache_key(api, entry.target)
    if remote == key and not force:
        result.action, result.detail = "skipped", f"{entry.target} is up to date (key {key[:12]})"
        return result
    why = "no conversion yet" if remote is None else "source or settings changed" if remote != key else "forced"
    if dry_run:
        result.action, result.detail = "would convert", f"{why} -> {entry.target}"
        return result
    if token is None:
        raise QconvError("no Hugging Face token to push with; set HF_TOKEN or pass --token")
    out = work_dir / entry.name
    shutil.rmtree(out, ignore_errors=True)
    try:
        _convert(entry, out, result.source_revision, token)
        _verify(entry, out, result.source_revision, token)
        from qconv.converter.push import push_output

        push_output(out, repo_id=entry.target, token=token, overwrite=True)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    result.action, result.detail = "converted", f"{why}; pushed {entry.target}"
    return result


def _convert(entry: ZooEntry, out: Path, revision: str, token: str) -> None:
    from qconv.converter.conversion import convert

    convert(entry.source, out, entry.settings, revision=revision, token=token, overwrite=True, progress=False)


def _verify(entry: ZooEntry, out: Path, revision: str, token: str) -> None:
    """verify_checkpoint against the (cached) source snapshot; a failed report fails the entry."""
    try:
        from qconv.converter.verify import verify_checkpoint
    except ImportError:
        logger.warning("%s: qconv.converter.verify is not available; skipping verification", entry.name)
        return
    from qconv.hub import download_snapshot

    source_dir, _ = download_snapshot(entry.source, revision=revision, token=token,
                                      allow_patterns=["*.json", "*.safetensors"])  # cached by convert
    report = verify_checkpoint(out, source=source_dir)
    if not report.ok:
        raise QconvError(f"verify failed: {'; '.join(report.problems[:3]) or 'see qconv verify'}")


def rebuild_zoo(entries: list[ZooEntry], *, token: str | None, only: list[str] | None = None,
                dry_run: bool = False, force: bool = False, work_dir: Path | None = None,
                keep: bool = False) -> list[ZooResult]:
    """Run :func:`rebuild_entry` for each selected entry, recording failures instead of stopping."""
    from huggingface_hub import HfApi

    from qconv.converter.push import hub_endpoint

    if only:
        unknown = sorted(set(only) - {e.name for e in entries})
        if unknown:
            raise QconvError(f"--only: no zoo entry named {', '.join(unknown)}")
        entries = [e for e in entries if e.name in only]
    api = HfApi(endpoint=hub_endpoint(), token=token if token else False)
    results = []
    with tempfile.TemporaryDirectory(prefix="qconv-zoo-", dir=work_dir) as tmp:
        for entry in entries:
            start = time.perf_counter()
            try:
                result = rebuild_entry(entry, api=api, token=token, work_dir=Path(tmp), dry_run=dry_run,
                                       force=force, keep=keep)
            except Exception as exc:  # one broken entry must not stop the zoo
                logger.debug("%s failed", entry.name, exc_info=True)
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if token:
                    message = message.replace(token, "***")
                result = ZooResult(entry.name, "failed", detail=f"{type(exc).__name__}: {message}")
            result.seconds = time.perf_counter() - start
            logger.info("%s: %s %s", entry.name, result.action, result.detail)
            results.append(result)
    return results


def format_table(results: list[ZooResult], entries: list[ZooEntry]) -> str:
    """The summary table printed at the end of a rebuild."""
    by_name = {e.name: e for e in entries}
    rows = [("name", "source", "revision", "action", "time", "detail")]
    for r in results:
        e = by_name[r.name]
        rows.append((r.name, e.source, (r.source_revision or "-")[:12], r.action, f"{r.seconds:.1f}s", r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    failed = sum(r.failed for r in results)
    lines.append(f"{len(results)} entries: {sum(r.action == 'converted' for r in results)} converted, "
                 f"{sum(r.action == 'skipped' for r in results)} skipped, {failed} failed")
    return "\n".join(lines)
