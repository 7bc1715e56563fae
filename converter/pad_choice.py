"""Which token becomes the pad token when a tokenizer has none, or an unusable one (issue 3).

The order of preference is documented on :func:`choose_pad_token`; every candidate must already have an
embedding row and must not be a BOS or EOS id of the model (``generation_config`` EOS lists included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Pad-token names, in order of preference, taken when the vocabulary has them (step 1 of the choice).
PAD_NAMES = (
    "<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<PAD>", "<|padding|>", "<|pad_token|>",
    "<|PAD_TOKEN|>",
)
#: Reserved / unused placeholder tokens (step 3): Llama 3, Gemma, BERT and similar spellings.
RESERVED_PATTERN = re.compile(r"^(<\|?|\[)(reserved|unused)[\w -]*?\d*(\|?>|\])$", re.IGNORECASE)
#: Document separators that are safe as pad when they are not an EOS of this model (step 4).
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>")
#: Names for a new pad token (step 6, last resort): the first that the vocabulary lacks.
NEW_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|qconv_pad|>")


@dataclass
class PadChoice:
    token: str
    id: int
    reason: str
    new: bool = False


def choose_pad_token(tokenizer, forbidden: set[int], rows: int) -> PadChoice:
    """The pad token to use, by preference (each must not be a BOS/EOS id and must have an embedding row).

    1. a dedicated pad token (:data:`PAD_NAMES`, in that order); 2. any other added token whose name contains
    ``pad`` (not FIM tokens); 3. a reserved/unused placeholder (:data:`RESERVED_PATTERN`, lowest id);
    4. ``<|endoftext|>`` / ``<|end_of_text|>`` when not an EOS of this model; 5. the unk token; 6. a new token
    (:data:`NEW_PAD_NAMES`) at id ``len(tokenizer)``, growing the embeddings when that is past the last row.
    """
    vocab = tokenizer.get_vocab()

    def usable(token: str | None) -> bool:
        tid = vocab.get(token) if token else None
        return tid is not None and 0 <= tid < rows and tid not in forbidden

    for name in PAD_NAMES:
        if usable(name):
            return PadChoice(name, vocab[name], "a dedicated pad token")
    added = sorted((i, t.content) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())
    for _, name in added:
        if "pad" in name.lower() and "fim" not in name.lower() and usable(name):
            return PadChoice(name, vocab[name], "an added pad token")
    reserved = sorted((tid, tok) for tok, tid in vocab.items() if RESERVED_PATTERN.match(tok))
    for _, name in reserved:
        if usable(name):
            return PadChoice(name, vocab[name], "a reserved, unused token")
    for name in END_OF_TEXT_NAMES:
        if usable(name):
            return PadChoice(name, vocab[name], "the end-of-text token, which is not an EOS of this model")
    unk = getattr(tokenizer, "unk_token", None)
    if usable(unk):
        return PadChoice(unk, vocab[unk], "the unk token (no pad, reserved or end-of-text token is free)")
    name = next(n for n in NEW_PAD_NAMES if n not in vocab)
    return PadChoice(name, len(tokenizer), "a new token: the vocabulary has no free token", new=True)
