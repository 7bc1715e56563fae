"""Embedding-row analysis for the tokenizer fixes: find the (input, output) embedding tensors, list untrained
rows, and build the tensor transforms that repair rows or grow the vocabulary.

"Untrained" rows are either near-zero (norm below ``NEAR_ZERO_RATIO`` x the median row norm) for any token,
or near-duplicates of another special token's row (distance below ``DUPLICATE_RATIO`` x the median row norm):
special tokens a model never saw in training keep their shared initial value. SmolLM2-135M-Instruct, for
instance, has eleven special tokens (``<file_sep>``, ``<jupyter_*>``, ...) whose rows differ by 0.25 % of a
row norm, while trained rows are 10-150 % of a row norm apart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from qconv.errors import QconvError

log = logging.getLogger(__name__)

#: Checkpoint names of the input embedding, most common first (Llama/Mistral/Qwen/Gemma/Phi, GPT-2, OPT, ...).
INPUT_EMBEDDING_NAMES = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "transformer.word_embeddings.weight",
    "transformer.embedding.word_embeddings.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "embed_tokens.weight",
)
#: Checkpoint names of the output embedding (absent in checkpoints of tied models).
OUTPUT_EMBEDDING_NAMES = (
    "lm_head.weight",
    "embed_out.weight",
    "output.weight",
    "transformer.output_layer.weight",
    "language_model.lm_head.weight",
)

NEAR_ZERO_RATIO = 1e-2  # a trained row is never 100x shorter than the median row
DUPLICATE_RATIO = 1e-2  # special-token rows closer than 1 % of a median row norm are copies of one init
_MAX_PAIRWISE = 4096  # above this many special tokens compare exact copies only (cdist would be too slow)
_CHUNK = 8192  # rows per chunk when computing norms / means in float32

ReadTensor = Callable[[str], torch.Tensor]


@dataclass
class Embedding:
    """One embedding matrix of the source checkpoint (rows = vocabulary entries)."""

    name: str
    tensor: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])


def _try_read(read_tensor: ReadTensor, name: str) -> torch.Tensor | None:
    """``read_tensor(name)``, or None when the checkpoint has no such tensor.

    The agreed signal is ``KeyError``; the converter's checkpoint reader raises ``QconvError`` for an unknown
    name, so that is taken to mean "absent" too (a real read failure recurs when the converter streams it).
    """
    try:
        return read_tensor(name)
    except (KeyError, QconvError):
        return None


def _names_from_skeleton(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """Ask transformers which parameters are the embeddings, on a model skeleton built on the meta device."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # unknown architecture, remote code, broken config: no names
        log.debug("no model skeleton for embedding lookup: %s", exc)
        return None, None
    by_module = {id(m): n for n, m in model.named_modules()}
    names = []
    for getter in (model.get_input_embeddings, model.get_output_embeddings):
        module = getter()
        names.append(f"{by_module[id(module)]}.weight" if module is not None and id(module) in by_module else None)
    return names[0], names[1]


def find_embeddings(config: dict[str, Any], read_tensor: ReadTensor) -> tuple[Embedding | None, Embedding | None]:
    """The input and output embeddings stored in the checkpoint (output is None when tied and not stored)."""
    found: list[Embedding | None] = []
    skeleton: tuple[str | None, str | None] | None = None
    for index, candidates in enumerate((INPUT_EMBEDDING_NAMES, OUTPUT_EMBEDDING_NAMES)):
        hit = None
        for name in candidates:
            tensor = _try_read(read_tensor, name)
            if tensor is not None and tensor.ndim == 2:
                hit = Embedding(name, tensor)
                break
        if hit is None and not (index == 1 and config.get("tie_word_embeddings")):  # tied: no output matrix
            skeleton = skeleton or _names_from_skeleton(config)
            name = skeleton[index]
            tensor = _try_read(read_tensor, name) if name else None
            if tensor is not None and tensor.ndim == 2:
                hit = Embedding(name, tensor)
        found.append(hit)
    return found[0], found[1]


def same_matrix(a: Embedding, b: Embedding) -> bool:
    """True when both embeddings hold the same values (a tied matrix stored under both names)."""
    x, y = a.tensor, b.tensor
    return x.shape == y.shape and x.dtype == y.dtype and (x.data_ptr() == y.data_ptr() or torch.equal(x, y))


def row_norms(tensor: torch.Tensor, limit: int | None = None) -> torch.Tensor:
    """float32 L2 norm of each of the first ``limit`` rows, computed in chunks to bound memory."""
    limit = tensor.shape[0] if limit is None else min(limit, tensor.shape[0])
    parts = [tensor[i:min(i + _CHUNK, limit)].float().norm(dim=1) for i in range(0, limit, _CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0)


def untrained_rows(tensor: torch.Tensor, token_count: int, special_ids: Iterable[int]) -> list[int]:
    """Ids (< ``token_count``) of rows that look untrained: near-zero, or copies among special tokens."""
    norms = row_norms(tensor, token_count)
    if norms.numel() == 0:
        return []
    median = float(norms.median())
    flagged = set(torch.nonzero(norms <= NEAR_ZERO_RATIO * median).flatten().tolist())
    special = sorted({i for i in special_ids if 0 <= i < norms.numel()} - flagged)
    if len(special) >= 2:
        rows = tensor[special].float()
        if len(special) <= _MAX_PAIRWISE:
            dist = torch.cdist(rows, rows)
            dist.fill_diagonal_(float("inf"))
            close = (dist <= DUPLICATE_RATIO * median).any(dim=1)
        else:
            _, inverse, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
            close = counts[inverse] > 1
        flagged.update(special[i] for i in torch.nonzero(close).flatten().tolist())
    return sorted(flagged)


def trained_mean(tensor: torch.Tensor, token_count: int, untrained: Iterable[int]) -> torch.Tensor:
    """float32 mean of the rows below ``token_count`` that are not listed as untrained."""
    limit = min(token_count, tensor.shape[0])
    keep = torch.ones(limit, dtype=torch.bool)
    bad = [i for i in untrained if 0 <= i < limit]
    keep[bad] = False
    total = torch.zeros(tensor.shape[1], dtype=torch.float64)
    for i in range(0, limit, _CHUNK):
        chunk = tensor[i:min(i + _CHUNK, limit)][keep[i:min(i + _CHUNK, limit)]]
        total += chunk.double().sum(dim=0)
    count = int(keep.sum())
    return (total / max(count, 1)).float()


def make_row_transform(
    set_rows: list[int], new_rows: int, mean: torch.Tensor, expected_shape: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transform that sets ``set_rows`` to ``mean`` and appends rows (= ``mean``) up to ``new_rows`` rows.

    It refuses a tensor whose shape differs from the one analysed (a converter mix-up, not user input).
    """
    set_rows = list(set_rows)

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) != tuple(expected_shape):
            raise ValueError(f"embedding transform: expected shape {tuple(expected_shape)}, got {tuple(tensor.shape)}")
        fill = mean.to(device=tensor.device, dtype=tensor.dtype)
        out = tensor.clone()
        if set_rows:
            out[set_rows] = fill
        extra = new_rows - tensor.shape[0]
        if extra > 0:
            out = torch.cat([out, fill.expand(extra, -1)], dim=0)
        return out

    return transform
