"""The model card (``README.md``) written into every converted checkpoint (issue 3). Interface stub."""

from __future__ import annotations

from pathlib import Path

from qconv.format import CARD_NAME, Manifest


def write_card(out_dir: Path, manifest: Manifest, config: dict, source_card: str | None = None) -> Path:
    """Write ``README.md`` into ``out_dir`` from the manifest, the written config, and the source's card text.

    Stub: a minimal card; issue 3 fills in the Hub header, settings, fixes, usage and license.
    """
    path = Path(out_dir) / CARD_NAME
    source = manifest.source.get("id", "unknown")
    path.write_text(f"# {source} (bnb 4-bit, converted by qconv)\n", encoding="utf-8")
    return path
