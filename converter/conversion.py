"""``convert()``: quantize a causal LM checkpoint to a bitsandbytes 4-bit (NF4) checkpoint, streaming.

Data flow: resolve the source -> plan every tensor with transformers' own rules -> plan tokenizer fixes
-> read one tensor at a time (a reader thread prefetches) -> cast, quantize with bitsandbytes (GPU when
present) -> shard writer (a writer thread) -> config, generation config, tokenizer files, card, manifest
-> rename the temporary directory to ``out``. An error or interrupt removes the temporary directory, so
``out`` either does not exist or is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qconv.errors import QconvError
from qconv.format import (
    CARD_NAME,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    MANIFEST_NAME,
    Manifest,
    QuantSettings,
    quantization_config,
    sha256_file,
    write_manifest,
)

logger = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    """The finished checkpoint directory, its manifest, and the run's statistics."""

    out_dir: Path
    manifest: Manifest
    stats: dict[str, Any]

    @property
    def summary(self) -> str:
        return format_summary(self.stats)


def convert(
    source: str | Path,
    out: str | Path,
    settings: QuantSettings = QuantSettings(),
    *,
    revision: str | None = None,
    token: str | None = None,
    device: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    fix_tokenizer: bool = True,
    fix_untrained_tokens: bool = False,
    progress: bool = True,
    repo_id: str | None = None,
) -> ConvertResult:
    """Convert ``source`` (local dir, Hub repo id, or ``.gguf``) into ``out``; see the module docstring.

    ``repo_id``: the Hub repo the output is meant for (the model card's usage snippets name it).
    """
    from qconv.converter.quantize import resolve_device
    from qconv.converter.shard_writer import parse_size
    from qconv.converter.source import resolve_source

    started = time.perf_counter()
    settings = settings.validate()
    out = Path(out).expanduser()
    _check_out(out, overwrite, source)
    max_shard_bytes = parse_size(max_shard_size)
    dev = resolve_device(device)

    with resolve_source(source, revision=revision, token=token) as src:
        from qconv.converter.plan import build_plan
        from qconv.converter.tokenizer_fix import plan_tokenizer_fixes

        marks = {"source_s": time.perf_counter()}  # phase end times, turned into durations in stats["timings"]
        plan = build_plan(src.config, src.checkpoint.infos, settings, where=str(source))
        marks["plan_s"] = time.perf_counter()
        tok_plan = plan_tokenizer_fixes(src.directory, dict(src.config), src.checkpoint.read,
                                        fix=fix_tokenizer, fix_untrained=fix_untrained_tokens)
        marks["tokenizer_s"] = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.qconv-tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            from qconv.converter.pipeline import write_tensors

            stats, files = write_tensors(src.checkpoint, plan, tok_plan.tensor_transforms, settings, dev, tmp,
                                         max_shard_bytes, progress=progress)
            marks["tensors_s"] = time.perf_counter()
            config = _output_config(src.config, settings, tok_plan.config_updates)
            _write_json(tmp / CONFIG_NAME, config)
            _write_generation_config(src.directory, plan.hf_config, tok_plan.generation_config_updates, tmp)
            tok_plan.save(tmp)
            for path in sorted(tmp.iterdir()):
                if path.is_file() and path.name not in files and path.name not in (MANIFEST_NAME, CARD_NAME):
                    files[path.name] = sha256_file(path)
            marks["files_s"] = time.perf_counter()
            identity = src.identity()  # may wait for the source's content hash
            marks["source_hash_wait_s"] = time.perf_counter()
            previous = started
            for key, mark in marks.items():
                stats["timings"][key] = round(mark - previous, 3)
                previous = mark
            stats["seconds"] = round(time.perf_counter() - started, 3)
            manifest = Manifest(source=identity, settings=settings.to_dict(), files=dict(sorted(files.items())),
                                tokenizer_fixes=[f.to_dict() for f in tok_plan.fixes], stats=stats)
            _write_card(tmp, manifest, config, src.card_text, repo_id)
            write_manifest(tmp, manifest)
            _install(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("wrote %s", out)  # the CLI echoes the summary line; the stats are in the manifest
    logger.debug("%s: %s", out, format_summary(stats))
    return ConvertResult(out_dir=out, manifest=manifest, stats=stats)


def format_summary(stats: dict[str, Any]) -> str:
    """One line for people: params, size before/after, bits per parameter, seconds."""
    return (
        f"{_count(stats['params'])} params, {_size(stats['source_bytes'])} -> "
        f"{_size(stats['output_bytes'])} ({stats['bits_per_param']:.2f} bits/param), "
        f"{stats['quantized_tensors']} quantized + {stats['kept_tensors']} kept tensors in "
        f"{stats['shards']} shard(s), {stats.get('seconds', 0):.1f} s on {stats['device']}"
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _check_out(out: Path, overwrite: bool, source: str | Path) -> None:
    src = Path(str(source)).expanduser()
    if src.exists():
        src_r, out_r = src.resolve(), out.resolve()
        if out_r == src_r or out_r in src_r.parents or src_r in out_r.parents:
            raise QconvError(f"--out {out}: must not be, contain, or lie inside the source {source}")
    if out.exists() or out.is_symlink():
        empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        if not (overwrite or empty_dir):
            raise QconvError(f"--out {out}: already exists (pass --overwrite to replace it)")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temp dir to ``out``; an old ``out`` is moved aside first and removed last."""
    old = None
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            old = out.parent / f".{out.name}.qconv-old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        else:  # appeared while we were converting
            raise QconvError(f"--out {out}: already exists (pass --overwrite to replace it)")
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _output_config(source_config: dict[str, Any], settings: QuantSettings, updates: dict[str, Any]) -> dict[str, Any]:
    config = dict(source_config)
    config.update(updates)
    config.pop("torch_dtype", None)
    config["dtype"] = settings.compute_dtype
    config["quantization_config"] = quantization_config(settings)
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_generation_config(source_dir: Path, hf_config, updates: dict[str, Any], tmp: Path) -> None:
    """Copy the source's generation config (or derive one from the model config, as transformers does)."""
    src = source_dir / GENERATION_CONFIG_NAME
    data: dict[str, Any] | None = None
    if src.is_file():
        try:
            data = json.loads(src.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QconvError(f"{src}: not valid JSON ({exc})") from exc
    if data is None:
        from transformers import GenerationConfig

        data = GenerationConfig.from_model_config(hf_config).to_diff_dict()
    data.update(updates)
    _write_json(tmp / GENERATION_CONFIG_NAME, data)


def _write_card(tmp: Path, manifest: Manifest, config: dict[str, Any], source_card: str | None,
                repo_id: str | None) -> None:
    from qconv.converter.card import write_card

    path = write_card(tmp, manifest, config, source_card, repo_id=repo_id)
    manifest.files[Path(path).name] = sha256_file(path)
    manifest.files = dict(sorted(manifest.files.items()))
