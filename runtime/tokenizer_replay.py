"""Load the tokenizer and replay the manifest's tokenizer fixes that matter at load time.

The converter records each change it made as a ``TokenizerFix`` dict (kind, detail, before, after,
applied; shapes in ``qconv/converter/tokenizer_fix.py``). Most are already baked into the saved files; at
load time we re-apply the ones a saved tokenizer can lose: ``pad_token`` (``after`` = ``{token, id, ...}``
or a plain token; only when the tokenizer has no pad token and the token exists with that id) and
``padding_side``. Then ``model.config`` and ``generation_config`` get the tokenizer's pad id. Findings
(``applied=False``) and everything else are not replayed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def load_tokenizer(directory: Path, *, trust_remote_code: bool, max_seq_length: int | None):
    """``AutoTokenizer`` from ``directory``; None (with a warning) when the checkpoint has no tokenizer."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files: returning tokenizer=None", directory)
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if max_seq_length is not None:
        tokenizer.model_max_length = max_seq_length
    return tokenizer


def _token_of(after: Any) -> str | None:
    if isinstance(after, str):
        return after
    if isinstance(after, Mapping):
        token = after.get("token", after.get("content"))
        return token if isinstance(token, str) else None
    return None


def replay_fixes(tokenizer, fixes: Iterable[Mapping[str, Any]]) -> list[str]:
    """Re-apply the load-time-relevant fixes to ``tokenizer``; return a line per change made."""
    done: list[str] = []
    for fix in fixes:
        kind, after = fix.get("kind"), fix.get("after")
        if not fix.get("applied", True):
            continue
        if kind == "pad_token":
            token = _token_of(after)
            if tokenizer.pad_token is not None or token is None:
                continue
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id in (None, tokenizer.unk_token_id) and token != tokenizer.unk_token:
                logger.warning("tokenizer fix pad_token=%r: token not in the vocabulary, not replayed", token)
                continue
            recorded_id = after.get("id") if isinstance(after, Mapping) else None
            if recorded_id is not None and recorded_id != token_id:
                logger.warning("tokenizer fix pad_token=%r: recorded id %s but the tokenizer says %s, not replayed", token, recorded_id, token_id)
                continue
            tokenizer.pad_token = token
            done.append(f"pad_token={token!r}")
        elif kind == "padding_side" and after in ("left", "right") and tokenizer.padding_side != after:
            tokenizer.padding_side = after
            done.append(f"padding_side={after!r}")
        else:
            logger.debug("tokenizer fix %s: stored in the files, nothing to replay", kind)
    return done


def sync_pad_ids(model, tokenizer) -> None:
    """Make ``model.config``/``generation_config`` agree with the tokenizer's pad token id."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        return
    configs = [model.config, getattr(model, "generation_config", None)]
    for cfg in configs:
        if cfg is None:
            continue
        current = getattr(cfg, "pad_token_id", None)
        if current != pad_id:
            if current is not None:
                logger.info("%s.pad_token_id %s -> %s (the tokenizer's)", type(cfg).__name__, current, pad_id)
            cfg.pad_token_id = pad_id
