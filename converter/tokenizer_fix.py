"""Tokenizer analysis and repair at convert time (issue 3).

The converter calls :func:`plan_tokenizer_fixes` once before writing tensors, applies the returned
plan's ``tensor_transforms`` to the matching tensors as it streams them, merges ``config_updates`` /
``generation_config_updates`` into the JSON it writes, calls ``plan.save(out_dir)`` to write tokenizer
files, and stores ``[f.to_dict() for f in plan.fixes]`` in the manifest's ``tokenizer_fixes``.

What is fixed (with ``fix=True``) and what is only recorded:

- pad token missing, equal to an EOS id, or outside the embedding rows -> a pad token is chosen by
  :func:`~qconv.converter.pad_choice.choose_pad_token` (fixed); ``pad_token_id`` of config.json and generation_config.json follow it;
- pad ids of config.json / generation_config.json that disagree with the tokenizer's -> synced (fixed);
- vocabulary ids beyond the embedding rows -> the embeddings grow, new rows = mean of trained rows (fixed);
- padding side: the training default ``right`` is recorded, and written when the source says ``left``;
- untrained embedding / lm_head rows -> listed; set to the mean of trained rows with ``fix_untrained``;
- chat template, double BOS, slow/fast disagreement -> recorded only (see :mod:`.tokenizer_checks`).

With ``fix=False`` every finding is still recorded (``applied=False``) and nothing changes.

Records (``TokenizerFix.kind``: ``before`` -> ``after``), read by the runtime's replay and by ``qconv verify``:
``pad_token``: ``{token, id}`` -> ``{token, id, added[, tensors]}``; ``pad_token_id``: ``{config[,
generation_config]}`` -> id; ``padding_side``: side -> ``"right"``; ``added_tokens_out_of_range``:
``{rows, ids, tokens}`` -> ``{rows, tensors}``; ``untrained_rows``: ``{tensor, ids, tokens, norms}`` ->
``{tensor, ids, norms}`` (or None); ``chat_template``, ``bos``, ``slow_fast``, ``tokenizer``: findings only.
``tensors`` names the embeddings whose rows were added or replaced.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qconv.converter import embedding_rows as er
from qconv.converter.pad_choice import choose_pad_token
from qconv.converter import tokenizer_checks as checks
from qconv.errors import QconvError
from qconv.format import GENERATION_CONFIG_NAME, TokenizerFix

log = logging.getLogger(__name__)

#: Files a tokenizer may consist of; copied verbatim when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
#: Files that describe special tokens; stale once the pad token changed, so not copied next to a re-save.
_SPECIAL_TOKEN_FILES = ("special_tokens_map.json", "added_tokens.json")

@dataclass
class TokenizerPlan:
    """What the converter must change: tensors, config entries, tokenizer files, and the record."""

    source_dir: Path | None
    fixes: list[TokenizerFix] = field(default_factory=list)
    config_updates: dict[str, Any] = field(default_factory=dict)
    generation_config_updates: dict[str, Any] = field(default_factory=dict)
    tensor_transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    # edits replayed on the tokenizer by save(); None = unchanged
    pad_token: str | None = field(default=None, repr=False)
    pad_token_id: int | None = field(default=None, repr=False)
    pad_token_is_new: bool = field(default=False, repr=False)
    padding_side: str | None = field(default=None, repr=False)

    @property
    def changes_tokenizer(self) -> bool:
        return self.pad_token is not None or self.padding_side is not None

    def save(self, out_dir: Path) -> list[str]:
        """Write the (possibly repaired) tokenizer files into ``out_dir``; return their names."""
        out_dir = Path(out_dir)
        if self.source_dir is None:
            return []
        if not self.changes_tokenizer:
            return _copy_files(Path(self.source_dir), out_dir, TOKENIZER_FILES)
        tokenizer = load_tokenizer(Path(self.source_dir))
        if tokenizer is None:
            raise QconvError(f"{self.source_dir}: the tokenizer could not be loaded again to save its fixes")
        if self.pad_token is not None:
            if self.pad_token_is_new:
                tokenizer.add_special_tokens({"pad_token": self.pad_token})
            else:
                tokenizer.pad_token = self.pad_token
            if tokenizer.pad_token_id != self.pad_token_id:
                raise QconvError(
                    f"{self.source_dir}: pad token {self.pad_token!r} got id {tokenizer.pad_token_id}, "
                    f"planned {self.pad_token_id}; the embeddings would not match"
                )
        if self.padding_side is not None:
            tokenizer.padding_side = self.padding_side
        saved = tokenizer.save_pretrained(str(out_dir))
        written = sorted({Path(p).name for p in saved if (out_dir / Path(p).name).is_file()})
        stale = set(_SPECIAL_TOKEN_FILES) | ({"chat_template.json"} if "chat_template.jinja" in written else set())
        rest = [n for n in TOKENIZER_FILES if n not in written and n not in stale]
        return sorted(written + _copy_files(Path(self.source_dir), out_dir, rest))


def _copy_files(src_dir: Path, out_dir: Path, names) -> list[str]:
    written = []
    for name in names:
        src = src_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            written.append(name)
    return written


def load_tokenizer(source_dir: Path):
    """``AutoTokenizer`` from a local folder (never remote code), or None when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source_dir), trust_remote_code=False)
    except Exception as exc:  # a custom tokenizer class, a broken file, a missing optional package
        log.warning("tokenizer in %s could not be loaded (%s); copying its files unchanged", source_dir, exc)
        return None


def _ids(value: Any) -> set[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {value}
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise QconvError(f"{path}: not readable JSON ({exc})") from exc


def _round(values: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in values.tolist()]


def plan_tokenizer_fixes(
    source_dir: Path | None,
    config: dict[str, Any],
    read_tensor: Callable[[str], torch.Tensor],
    *,
    fix: bool = True,
    fix_untrained: bool = False,
) -> TokenizerPlan:
    """Analyse the tokenizer in ``source_dir`` against ``config`` and the embeddings (via ``read_tensor``).

    ``read_tensor(name)`` returns one source tensor by its checkpoint name (e.g. ``model.embed_tokens.weight``)
    and raises ``KeyError`` when the checkpoint has no tensor of that name.
    """
    plan = TokenizerPlan(source_dir=Path(source_dir) if source_dir is not None else None)
    if source_dir is None or not any((Path(source_dir) / n).is_file() for n in TOKENIZER_FILES):
        plan.fixes.append(TokenizerFix("tokenizer", "the source has no tokenizer files", applied=False))
        return plan
    tokenizer = load_tokenizer(Path(source_dir))
    if tokenizer is None:
        plan.fixes.append(TokenizerFix(
            "tokenizer", "the tokenizer could not be loaded without remote code; its files are copied unchanged",
            applied=False,
        ))
        return plan
    generation_config = _read_json(Path(source_dir) / GENERATION_CONFIG_NAME)

    embed, output = er.find_embeddings(config, read_tensor)
    rows = embed.rows if embed else int(config.get("vocab_size") or len(tokenizer))
    plan.fixes += checks.check_chat_template(tokenizer)
    plan.fixes += checks.check_bos(tokenizer)
    plan.fixes += checks.check_slow_fast(Path(source_dir), tokenizer)

    target_rows = _plan_out_of_range(plan, tokenizer, rows, fix, can_grow=embed is not None)
    new_pad_id = _plan_pad(plan, tokenizer, config, generation_config, rows, fix, can_grow=embed is not None)
    if new_pad_id is not None:
        target_rows = max(target_rows, new_pad_id + 1)

    side = checks.check_padding_side(tokenizer, fix)
    plan.fixes.append(side)
    if side.applied:
        plan.padding_side = "right"

    if embed is None:
        plan.fixes.append(TokenizerFix(
            "untrained_rows", "no embedding tensor found in the checkpoint: embedding rows were not checked",
            applied=False,
        ))
        return plan
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    duplicate = output is not None and er.same_matrix(embed, output)  # tied, stored twice: one finding
    for emb, record in ((embed, True), (output, not duplicate)):
        if emb is not None:
            _plan_embedding(plan, tokenizer, emb, special, target_rows, new_pad_id, fix, fix_untrained, record)
    if fix and target_rows > rows:
        plan.config_updates["vocab_size"] = target_rows
    for record in plan.fixes:  # name the tensors whose rows a pad token or the growth changed (verify reads it)
        if record.applied and record.kind in ("pad_token", "added_tokens_out_of_range") and isinstance(record.after, dict):
            if record.kind == "added_tokens_out_of_range" or record.after.get("added"):
                record.after["tensors"] = sorted(plan.tensor_transforms)
    return plan


def _plan_out_of_range(plan: TokenizerPlan, tokenizer, rows: int, fix: bool, can_grow: bool) -> int:
    """Record vocabulary ids with no embedding row; return the row count needed to cover them (when fixed)."""
    beyond = sorted((tid, tok) for tok, tid in tokenizer.get_vocab().items() if tid >= rows)
    if not beyond:
        return rows
    applied = fix and can_grow
    needed = beyond[-1][0] + 1
    plan.fixes.append(TokenizerFix(
        "added_tokens_out_of_range",
        f"{len(beyond)} token id(s) have no embedding row (the embeddings have {rows} rows)"
        + (f"; the embeddings grow to {needed} rows, new rows = mean of trained rows" if applied else ""),
        before={"rows": rows, "ids": [t for t, _ in beyond], "tokens": [s for _, s in beyond]},
        after={"rows": needed} if applied else None,
        applied=applied,
    ))
    return needed if applied else rows


def _plan_pad(plan, tokenizer, config, generation_config, rows: int, fix: bool, can_grow: bool) -> int | None:
    """Choose or sync the pad token; return the id of a newly added pad token (its rows are filled)."""
    eos_ids = _ids(tokenizer.eos_token_id) | _ids(config.get("eos_token_id")) | _ids(generation_config.get("eos_token_id"))
    forbidden = eos_ids | _ids(tokenizer.bos_token_id) | _ids(config.get("bos_token_id"))
    pad, pad_id = tokenizer.pad_token, tokenizer.pad_token_id
    if pad is None:
        problem = "the tokenizer has no pad token"
    elif pad_id in eos_ids:
        problem = (f"the pad token {pad} is an EOS token: collators that mask padding also hide EOS from the loss, "
                   "so fine-tunes never learn to stop")
    elif pad_id is None or not 0 <= pad_id < rows:
        problem = f"the pad id {pad_id} is outside the {rows} embedding rows"
    else:
        problem = None
    new_pad_id = None
    if problem is not None:
        choice = choose_pad_token(tokenizer, forbidden, rows)
        applied = fix and (can_grow or choice.id < rows)
        plan.fixes.append(TokenizerFix(
            "pad_token", f"{problem}; pad token: {choice.token} (id {choice.id}, {choice.reason})",
            before={"token": pad, "id": pad_id},
            after={"token": choice.token, "id": choice.id, "added": choice.new},
            applied=applied,
        ))
        if not applied:
            return None
        plan.pad_token, plan.pad_token_id, plan.pad_token_is_new = choice.token, choice.id, choice.new
        pad_id = choice.id
        new_pad_id = choice.id if choice.new else None
    before = {"config": config.get("pad_token_id")}
    if generation_config:
        before["generation_config"] = generation_config.get("pad_token_id")
    if problem is None and all(v == pad_id for v in before.values()):
        return None
    if problem is None:
        plan.fixes.append(TokenizerFix(
            "pad_token_id", f"pad_token_id in the config files did not match the tokenizer's pad id {pad_id}",
            before=before, after=pad_id, applied=fix,
        ))
    if fix:
        plan.config_updates["pad_token_id"] = pad_id
        plan.generation_config_updates["pad_token_id"] = pad_id
    return new_pad_id


def _plan_embedding(plan, tokenizer, emb: er.Embedding, special: set[int], target_rows: int,
                    new_pad_id: int | None, fix: bool, fix_untrained: bool, record: bool = True) -> None:
    """Untrained-row finding for one embedding, and its transform (repair, new pad row, growth)."""
    token_count = min(len(tokenizer), emb.rows)
    untrained = er.untrained_rows(emb.tensor, token_count, special)
    repair = fix and fix_untrained and bool(untrained)
    mean = er.trained_mean(emb.tensor, token_count, untrained)
    if untrained and record:
        norms = er.row_norms(emb.tensor)[untrained]
        mean_norm = float(mean.to(emb.tensor.dtype).float().norm())
        shown = ", ".join(map(str, untrained[:16])) + (", ..." if len(untrained) > 16 else "")
        plan.fixes.append(TokenizerFix(
            "untrained_rows",
            f"{len(untrained)} row(s) of {emb.name} look untrained (near-zero, or copies among special tokens): "
            f"ids {shown}" + ("; set to the mean of trained rows" if repair else
                              "; --fix-untrained-tokens sets them to the mean of trained rows"),
            before={"tensor": emb.name, "ids": untrained, "tokens": tokenizer.convert_ids_to_tokens(untrained),
                    "norms": _round(norms)},
            after={"tensor": emb.name, "ids": untrained, "norms": [float(f"{mean_norm:.6g}")] * len(untrained)}
            if repair else None,
            applied=repair,
        ))
    if not fix:
        return
    set_rows = list(untrained) if repair else []
    if new_pad_id is not None and new_pad_id < emb.rows:
        set_rows.append(new_pad_id)
    if set_rows or target_rows > emb.rows:
        plan.tensor_transforms[emb.name] = er.make_row_transform(
            sorted(set(set_rows)), target_rows, mean, tuple(emb.tensor.shape)
        )
