"""Tokenizer analysis and repair at convert time (issue 3). Interface stub: copies files, fixes nothing.

The converter calls :func:`plan_tokenizer_fixes` once before writing tensors, applies the returned
plan's ``tensor_transforms`` to the matching tensors as it streams them, merges ``config_updates`` /
``generation_config_updates`` into the JSON it writes, calls ``plan.save(out_dir)`` to write tokenizer
files, and stores ``[f.to_dict() for f in plan.fixes]`` in the manifest's ``tokenizer_fixes``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qconv.format import TokenizerFix

#: Files a tokenizer may consist of; copied verbatim when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class TokenizerPlan:
    """What the converter must change: tensors, config entries, tokenizer files, and the record."""

    source_dir: Path | None
    fixes: list[TokenizerFix] = field(default_factory=list)
    config_updates: dict[str, Any] = field(default_factory=dict)
    generation_config_updates: dict[str, Any] = field(default_factory=dict)
    tensor_transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)

    def save(self, out_dir: Path) -> list[str]:
        """Write the (possibly repaired) tokenizer files into ``out_dir``; return their names."""
        written = []
        if self.source_dir is None:
            return written
        for name in TOKENIZER_FILES:
            src = Path(self.source_dir) / name
            if src.is_file():
                shutil.copyfile(src, Path(out_dir) / name)
                written.append(name)
        return written


def plan_tokenizer_fixes(
    source_dir: Path | None,
    config: dict[str, Any],
    read_tensor: Callable[[str], torch.Tensor],
    *,
    fix: bool = True,
    fix_untrained: bool = False,
) -> TokenizerPlan:
    """Analyse the tokenizer in ``source_dir`` against ``config`` and the embeddings (via ``read_tensor``).

    ``read_tensor(name)`` returns one source tensor by its checkpoint name (e.g. ``model.embed_tokens.weight``).
    Stub: records nothing and copies the tokenizer files as they are.
    """
    return TokenizerPlan(source_dir=source_dir)
