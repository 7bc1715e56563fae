"""Per-model-family patches that swap qconv Triton kernels into a loaded transformers model.

Each family file declares a :class:`FamilyPatch` (which module classes hold RMSNorm, the gated MLP and
the attention that applies RoPE); :func:`apply_patches` turns the declaration into per-instance class
swaps (a cached subclass whose ``forward`` calls the kernel), so parameters, names, ``isinstance`` and
state dicts are unchanged and an unpatched model is never affected.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

#: op -> qconv.kernels public function name
OPS = {"rms_norm": "rms_norm", "swiglu": "swiglu", "geglu": "geglu", "rope": "apply_rope", "cross_entropy": "cross_entropy"}


@dataclass(frozen=True)
class FamilyPatch:
    """What to swap in one model family (class names are looked up in ``modeling_module``)."""

    model_types: tuple[str, ...]
    modeling_module: str
    rms_norm: str | None = None
    rms_norm_eps_attr: str = "variance_epsilon"
    rms_norm_offset: float = 0.0  # Gemma scales by (1 + weight)
    mlp: str | None = None
    activation_attr: str = "hidden_act"  # config attribute naming the MLP activation
    attention: str | None = None  # its forward calls the module-level apply_rotary_pos_emb
    cross_entropy: bool = True


REGISTRY: dict[str, FamilyPatch] = {}


def register(patch: FamilyPatch) -> FamilyPatch:
    for model_type in patch.model_types:
        REGISTRY[model_type] = patch
    return patch


def _load_families() -> None:
    if not REGISTRY:
        for name in ("llama", "mistral", "qwen2", "gemma2"):
            importlib.import_module(f"{__name__}.{name}")


def kernel(op: str) -> Callable:
    """The ``qconv.kernels`` function for ``op`` (imports triton on first use)."""
    from qconv import kernels

    return getattr(kernels, OPS[op])


def patch_for(model_type: str) -> FamilyPatch | None:
    _load_families()
    return REGISTRY.get(model_type)


def apply_patches(model: Any) -> list[str]:
    """Patch ``model`` in place for its family; return the ops patched (empty: nothing changed)."""
    from qconv.runtime.patches.modules import patch_model

    config = getattr(model, "config", None)
    family = patch_for(getattr(config, "model_type", ""))
    if family is None:
        logger.info("no qconv patch for model_type %r: stock transformers modules", getattr(config, "model_type", None))
        return []
    return patch_model(model, family, kernel)
