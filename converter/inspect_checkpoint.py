"""``qconv inspect``: describe a converted checkpoint from its headers, config and manifest (no tensor loads).

Only safetensors headers are parsed, plus the few bytes of each packed quant-state JSON, so inspecting a
multi-GiB checkpoint takes milliseconds and imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from qconv import format as fmt
from qconv import safetensors_header as sth
from qconv.errors import QconvError


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / fmt.CONFIG_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QconvError(f"{directory}: no {fmt.CONFIG_NAME}, so this is not a checkpoint directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QconvError(f"{path}: not readable JSON ({exc})") from exc


def inspect_checkpoint(directory: str | Path) -> dict[str, Any]:
    """A JSON-ready summary: architecture, parameters, tensors, bytes, bits/param, settings, fixes, source."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QconvError(f"{directory}: not a directory")
    config = _read_config(directory)
    manifest = fmt.read_manifest(directory)
    headers = sth.read_all_headers(directory)
    if not headers:
        raise QconvError(f"{directory}: no safetensors weights found")

    quantized = fmt.quantized_weight_names(headers)
    states: dict[str, dict] = {}
    for weight, quant_type in quantized.items():
        try:
            states[weight] = json.loads(headers[f"{weight}.{fmt.packed_state_suffix(quant_type)}"].read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QconvError(f"{weight}: unreadable packed quant state ({exc}); run qconv verify") from exc
    kept = [h for n, h in headers.items() if n not in quantized and not fmt.is_state_tensor(n)]
    quantized_params = sum(math.prod(int(d) for d in s.get("shape", ())) for s in states.values())
    kept_params = sum(h.numel for h in kept)
    params = quantized_params + kept_params
    files = sth.weight_files(directory)
    weight_bytes = sum(p.stat().st_size for p in files)
    qc = config.get("quantization_config") or {}

    return {
        "directory": directory.name,
        "architecture": ", ".join(config.get("architectures") or [])
        or ((manifest.stats or {}).get("model_class") if manifest else None),
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "params": params,
        "quantized_params": quantized_params,
        "quantized_tensors": len(quantized),
        "kept_tensors": len(kept),
        "kept_dtypes": dict(sorted(Counter(h.dtype for h in kept).items())),
        "weight_files": len(files),
        "weight_bytes": weight_bytes,
        "total_bytes": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
        "tensor_bytes": sum(h.nbytes for h in headers.values()),
        "bits_per_param": round(8 * sum(h.nbytes for h in headers.values()) / params, 3) if params else None,
        "quantization": {
            "quant_method": qc.get("quant_method"),
            "quant_types": sorted({s.get("quant_type") for s in states.values()} - {None}),
            "blocksizes": sorted({int(s["blocksize"]) for s in states.values() if "blocksize" in s}),
            "double_quant": qc.get("bnb_4bit_use_double_quant"),
            "compute_dtype": qc.get("bnb_4bit_compute_dtype"),
            "quant_storage": qc.get("bnb_4bit_quant_storage"),
            "skip_modules": qc.get("llm_int8_skip_modules"),
        },
        "tokenizer_fixes": [
            {"kind": f.get("kind"), "applied": bool(f.get("applied")), "detail": f.get("detail")}
            for f in (manifest.tokenizer_fixes if manifest else [])
        ],
        "source": dict(manifest.source) if manifest else None,
        "qconv_version": manifest.qconv_version if manifest else None,
        "manifest": manifest is not None,
    }


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_table(info: dict[str, Any]) -> str:
    """The summary as an aligned two-column table for people."""
    q = info["quantization"]
    source = info.get("source") or {}
    fixes = info["tokenizer_fixes"]
    rows = [
        ("architecture", f"{info['architecture'] or '?'} ({info['model_type']}, {info['layers']} layers, "
                         f"hidden {info['hidden_size']}, vocab {info['vocab_size']})"),
        ("parameters", f"{info['params']:,} ({info['quantized_params']:,} quantized)"),
        ("tensors", f"{info['quantized_tensors']} quantized, {info['kept_tensors']} kept "
                    f"({', '.join(f'{n} {d}' for d, n in info['kept_dtypes'].items()) or 'none'})"),
        ("on disk", f"{_size(info['weight_bytes'])} in {info['weight_files']} weight file(s), "
                    f"{_size(info['total_bytes'])} in all"),
        ("bits / param", f"{info['bits_per_param']} (tensor data / parameters)"),
        ("quantization", f"{'/'.join(q['quant_types']) or '-'}, blocksize {'/'.join(map(str, q['blocksizes'])) or '-'}, "
                         f"double quant {q['double_quant']}, compute {q['compute_dtype']}, storage {q['quant_storage']}"),
        ("skip modules", ", ".join(q["skip_modules"] or []) or "-"),
        ("source", f"{source.get('id', '-')} ({source.get('kind', '?')})" if source else "no qconv manifest"),
        ("revision", source.get("revision") or "-"),
        ("tokenizer fixes", f"{sum(f['applied'] for f in fixes)} applied, "
                            f"{sum(not f['applied'] for f in fixes)} noted" if fixes else "none"),
    ]
    rows += [("", f"[{'fixed' if f['applied'] else 'noted'}] {f['kind']}: {f['detail']}") for f in fixes]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
