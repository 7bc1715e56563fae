"""The model card (``README.md``) written into every converted checkpoint (issue 3).

Hub metadata header (``base_model`` when the source is a Hub repo, tags, ``library_name``, ``pipeline_tag``,
the source's license), the quantization settings, the tokenizer fixes from the manifest, and how to load
the result with qconv and with plain transformers. The card never names a local path (a local source
appears by its folder or file name only) and never a token: it is built from the manifest's source id,
settings, stats and fixes only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from qconv import __version__
from qconv.format import CARD_NAME, Manifest

TAGS = ["bnb-4bit", "4-bit", "bitsandbytes", "qconv"]
LICENSE_KEYS = ("license", "license_name", "license_link")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.DOTALL)


def source_name(manifest: Manifest) -> str:
    """How the card names the source: the repo id for the Hub, else the folder or file name only."""
    source = manifest.source or {}
    ident = str(source.get("id") or "model")
    if source.get("kind") == "hub" and _REPO_ID.match(ident):
        return ident
    return Path(ident.rstrip("/\\")).name or "model"


def card_metadata(source_card: str | None) -> dict[str, Any]:
    """The YAML front matter of a model card, or ``{}`` when it has none or it is not valid YAML."""
    match = _FRONT_MATTER.match(source_card or "")
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _header(manifest: Manifest, source_card: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    source = manifest.source or {}
    if source.get("kind") == "hub" and _REPO_ID.match(str(source.get("id", ""))):
        meta["base_model"] = source["id"]
    upstream = card_metadata(source_card)
    meta.update({k: upstream[k] for k in LICENSE_KEYS if upstream.get(k)})
    quant_type = str(manifest.settings.get("quant_type", "nf4"))
    meta["tags"] = TAGS + ([quant_type] if quant_type not in TAGS else [])
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    return meta


def _cell(value: Any) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text.replace("<", "&lt;").replace(">", "&gt;")  # token names like <pad> are not HTML tags


def _settings_rows(manifest: Manifest) -> list[tuple[str, str]]:
    s = manifest.quant_settings
    rows = [
        ("quant type", s.quant_type.upper()),
        ("blocksize", str(s.blocksize)),
        ("double quantization", "yes" if s.double_quant else "no"),
        ("compute dtype", s.compute_dtype),
        ("quant storage", s.quant_storage),
    ]
    if s.skip_modules:
        rows.append(("kept unquantized", ", ".join(s.skip_modules)))
    st = manifest.stats or {}
    if st.get("params"):
        rows.append(("parameters", f"{int(st['params']):,}"))
    if st.get("quantized_tensors") is not None:
        rows.append(("tensors", f"{st['quantized_tensors']} quantized, {st.get('kept_tensors', 0)} kept"))
    if st.get("output_bytes"):
        rows.append(("size", f"{st['output_bytes'] / 1e6:,.1f} MB"
                     + (f" ({st['bits_per_param']:.2f} bits/param)" if st.get("bits_per_param") else "")))
    return rows


def _fix_lines(manifest: Manifest) -> list[str]:
    fixes = manifest.tokenizer_fixes or []
    if not fixes:
        return ["No tokenizer problems were found."]
    lines = ["Checked once at conversion and recorded in `qconv_manifest.json` (qconv's loader replays it).", "",
             "| check | status | detail |", "|---|---|---|"]
    for fix in fixes:
        status = "fixed" if fix.get("applied") else "noted"
        lines.append(f"| {_cell(fix.get('kind', ''))} | {status} | {_cell(fix.get('detail', ''))} |")
    return lines


def render_card(manifest: Manifest, config: dict, source_card: str | None = None, repo_id: str | None = None) -> str:
    """The card's text (see the module docstring)."""
    name = source_name(manifest)
    short = name.rsplit("/", 1)[-1]
    if short.lower().endswith(".gguf"):
        short = short[:-5]
    repo = repo_id or f"your-username/{short}-bnb-4bit"
    settings = manifest.quant_settings
    source = manifest.source or {}
    kind = source.get("kind")
    shown = f"[{name}](https://huggingface.co/{name})" if "base_model" in _header(manifest, None) else f"`{name}`"
    arch = (", ".join(config.get("architectures") or []) or (manifest.stats or {}).get("model_class")
            or config.get("model_type", ""))
    lines = ["---", yaml.safe_dump(_header(manifest, source_card), sort_keys=False).rstrip(), "---", "",
             f"# {short} (bitsandbytes 4-bit)", "",
             f"{shown} quantized to {settings.quant_type.upper()} with bitsandbytes"
             f"{' (double quantization)' if settings.double_quant else ''} by qconv {manifest.qconv_version or __version__}. "
             "It is a standard bitsandbytes 4-bit checkpoint: plain transformers loads it, and qconv's loader "
             "loads it faster, ready for QLoRA.", "",
             "## Source", "", "| | |", "|---|---|",
             f"| model | {_cell(shown)} |",
             f"| kind | {_cell({'hub': 'Hugging Face Hub', 'dir': 'local folder', 'gguf': 'GGUF file'}.get(kind, kind))} |"]
    if arch:
        lines.append(f"| architecture | {_cell(arch)} |")
    if source.get("revision"):
        lines.append(f"| revision | `{_cell(source['revision'])}` |")
    lines += ["", "## Quantization", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in _settings_rows(manifest)]
    lines += ["", "## Tokenizer", ""] + _fix_lines(manifest)
    lines += ["", "## Usage", "", "With qconv (fast load, patched for QLoRA training):", "", "```python",
              "from qconv import runtime", "", f'model, tok = runtime.from_pretrained("{repo}")', "```", "",
              "With plain transformers and bitsandbytes (the quantization config is in `config.json`):", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
              f'tok = AutoTokenizer.from_pretrained("{repo}")', "```", "",
              "Check the files against the manifest with `qconv verify <folder>`.", "", "## License", ""]
    license_ = card_metadata(source_card).get("license")
    lines.append(f"`{_cell(license_)}`, as declared by the source model's card." if license_ else
                 "The source model's license applies; its card declared none, so check the source before use.")
    return "\n".join(lines) + "\n"


def write_card(out_dir: Path, manifest: Manifest, config: dict, source_card: str | None = None, *,
               repo_id: str | None = None) -> Path:
    """Write ``README.md`` into ``out_dir`` from the manifest, the written config, and the source's card text.

    ``repo_id`` (optional) is the repo the checkpoint will be pushed to; the usage snippets name it.
    """
    path = Path(out_dir) / CARD_NAME
    path.write_text(render_card(manifest, config, source_card, repo_id), encoding="utf-8")
    return path
