"""Record-only tokenizer checks (issue 3): chat template, BOS handling, slow/fast agreement.

Each check takes a loaded tokenizer and returns :class:`~qconv.format.TokenizerFix` findings with
``applied=False``: these are things a user should know, which qconv does not change, because every
change would alter behaviour someone may rely on:

- a missing chat template or one without an ``add_generation_prompt`` branch: qconv never invents templates;
- double BOS (the tokenizer adds BOS and the chat template starts with it): turning ``add_bos_token`` off
  would drop BOS from plain-text training, and editing the template would change what ``apply_chat_template``
  returns; the finding says how to avoid it (``apply_chat_template(..., tokenize=True)`` or tokenize the
  rendered text with ``add_special_tokens=False``);
- a slow (SentencePiece) tokenizer file that encodes differently from ``tokenizer.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from qconv.format import TokenizerFix

log = logging.getLogger(__name__)

#: Strings the slow and fast tokenizers must encode identically (spaces, digits, unicode, code).
SAMPLE_TEXTS = (
    "Hello world",
    "  leading spaces and\ttabs\nnew lines",
    "The year 2026 has 365 days; pi is 3.14159.",
    "naïve café, 東京, emoji 🙂",
    "def f(x):\n    return x ** 2",
)
_PROBE_CHAT = [{"role": "user", "content": "Hello"}]


def _finding(kind: str, detail: str, before: Any = None, after: Any = None) -> TokenizerFix:
    return TokenizerFix(kind=kind, detail=detail, before=before, after=after, applied=False)


def _templates(tokenizer) -> dict[str, str]:
    """The tokenizer's chat templates by name (a single template is called ``default``)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, dict):
        return {str(k): v for k, v in template.items() if isinstance(v, str)}
    if isinstance(template, list):  # [{"name": ..., "template": ...}] as stored in some tokenizer_config files
        return {str(t.get("name")): t.get("template") for t in template if isinstance(t, dict) and t.get("template")}
    return {}


def check_chat_template(tokenizer) -> list[TokenizerFix]:
    """A missing template, or templates that ignore ``add_generation_prompt``."""
    templates = _templates(tokenizer)
    if not templates:
        return [_finding(
            "chat_template",
            "the tokenizer has no chat template; chat fine-tuning needs one (qconv does not invent templates)",
        )]
    lacking = sorted(name for name, text in templates.items() if "add_generation_prompt" not in text)
    if not lacking:
        return []
    return [_finding(
        "chat_template",
        f"chat template(s) {', '.join(lacking)} have no add_generation_prompt branch: "
        "generation prompts must be appended by hand",
        before={"templates": lacking},
    )]


def adds_bos(tokenizer) -> bool:
    """True when encoding plain text with special tokens prepends the BOS token."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    try:
        with_special = tokenizer("Hello", add_special_tokens=True)["input_ids"]
        plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    except Exception as exc:  # a tokenizer that cannot encode is reported elsewhere
        log.debug("BOS probe failed: %s", exc)
        return False
    return bool(with_special) and with_special[0] == bos_id and (not plain or plain[0] != bos_id)


def template_starts_with_bos(tokenizer) -> bool:
    """True when the rendered chat template (default template) itself begins with the BOS token text."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not _templates(tokenizer):
        return False
    try:
        text = tokenizer.apply_chat_template(_PROBE_CHAT, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # templates may demand a system message, tools, etc.
        log.debug("chat template probe failed: %s", exc)
        return False
    return isinstance(text, str) and text.lstrip().startswith(bos)


def check_bos(tokenizer) -> list[TokenizerFix]:
    """Double BOS: the tokenizer adds BOS and the chat template already starts with it."""
    if not (adds_bos(tokenizer) and template_starts_with_bos(tokenizer)):
        return []
    bos = tokenizer.bos_token
    return [_finding(
        "bos",
        f"double BOS: the tokenizer adds {bos} and the chat template starts with {bos}; tokenizing rendered "
        "chat text with add_special_tokens=True gives two. Use apply_chat_template(..., tokenize=True) or "
        "add_special_tokens=False (qconv changes neither the template nor add_bos_token)",
        before={"add_bos_token": True, "template_starts_with_bos": True},
    )]


def encoding_mismatches(
    reference_encode: Callable[[str], Sequence[int]], tokenizer, samples: Sequence[str] = SAMPLE_TEXTS
) -> list[dict[str, Any]]:
    """Samples on which ``reference_encode`` and the fast tokenizer (no special tokens) give different ids."""
    out = []
    for text in samples:
        reference = list(reference_encode(text))
        fast = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if reference != fast:
            out.append({"text": text, "slow": reference, "fast": fast})
    return out


def _sentencepiece_encoder(model_file: Path) -> Callable[[str], Sequence[int]] | None:
    try:
        import sentencepiece
    except ImportError:
        return None
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return lambda text: processor.encode(text)


def check_slow_fast(source_dir: Path, tokenizer, reference_encode: Callable[[str], Sequence[int]] | None = None) -> list[TokenizerFix]:
    """Compare the slow tokenizer file (``tokenizer.model``) with ``tokenizer.json`` on :data:`SAMPLE_TEXTS`.

    ``reference_encode`` overrides the slow encoder (tests). Without a slow file there is nothing to compare.
    """
    model_file = Path(source_dir) / "tokenizer.model"
    if reference_encode is None:
        if not model_file.is_file() or not (Path(source_dir) / "tokenizer.json").is_file():
            return []
        reference_encode = _sentencepiece_encoder(model_file)
        if reference_encode is None:
            return [_finding(
                "slow_fast", "tokenizer.model was not compared with tokenizer.json: the sentencepiece package is "
                "not installed",
            )]
    mismatches = encoding_mismatches(reference_encode, tokenizer)
    if not mismatches:
        return []
    first = mismatches[0]
    return [_finding(
        "slow_fast",
        f"the slow and fast tokenizers disagree on {len(mismatches)} of {len(SAMPLE_TEXTS)} sample strings "
        f"(e.g. {first['text']!r}); the fast tokenizer (tokenizer.json) is the one transformers uses",
        before=mismatches,
    )]


def check_padding_side(tokenizer, fix: bool) -> TokenizerFix:
    """Record the training padding side (right); the saved tokenizer uses it when ``fix`` and it differs."""
    before = getattr(tokenizer, "padding_side", "right")
    changed = fix and before != "right"
    return TokenizerFix(
        kind="padding_side",
        detail="training pads on the right (set tokenizer.padding_side = 'left' for batched generation)"
        + ("; the saved tokenizer now pads on the right" if changed else ""),
        before=before,
        after="right",
        applied=changed,
    )
