"""Build the model without weights: config (with ``max_seq_length``), class, meta skeleton, Linear4bit swap.

transformers is imported narrowly and only here: the config class, the causal-LM mapping, and the one
modeling module the config names. bitsandbytes is imported for ``Linear4bit``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from qconv.errors import QconvError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    from qconv.format import QuantSettings

logger = logging.getLogger(__name__)


def load_config(directory: Path, *, trust_remote_code: bool) -> "PretrainedConfig":
    """The transformers config of ``directory`` (remote code only when asked)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise QconvError(f"{directory}: the model needs its own code; pass trust_remote_code=True if you trust it") from exc
        raise QconvError(f"{directory}/config.json: transformers cannot read it ({str(exc).splitlines()[0]})") from exc


def model_class(config: "PretrainedConfig", directory: Path, *, trust_remote_code: bool) -> type:
    """The ``AutoModelForCausalLM`` class for ``config``; remote classes only with ``trust_remote_code``."""
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(directory))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        hint = "; it has its own code: pass trust_remote_code=True" if "AutoModelForCausalLM" in auto_map else ""
        raise QconvError(
            f"{directory}: model_type {config.model_type!r} is not a causal language model transformers knows{hint}"
        ) from None


def apply_max_seq_length(config: "PretrainedConfig", max_seq_length: int) -> str:
    """Extend the context window to ``max_seq_length`` the way transformers configures RoPE scaling.

    Within the native window nothing changes. Beyond it, default RoPE becomes ``linear`` with
    ``factor = max_seq_length / max_position_embeddings`` (an existing linear factor is multiplied);
    ``dynamic`` RoPE scales itself; other scaled types (llama3, yarn, ...) are left alone with a warning.
    Returns a short description of what was done.
    """
    if not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise QconvError(f"max_seq_length: expected a positive integer, got {max_seq_length!r}")
    native = getattr(config, "max_position_embeddings", None)
    if not native or max_seq_length <= native:
        return "within the native window"
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        logger.warning("max_seq_length=%d exceeds the native window %d and the model has no RoPE to scale", max_seq_length, native)
        return "no RoPE parameters"
    groups = list(params.values()) if all(isinstance(v, dict) for v in params.values()) else [params]
    types = {g.get("rope_type", g.get("type", "default")) for g in groups}
    if not types <= {"default", "linear", "dynamic"}:
        logger.warning(
            "max_seq_length=%d exceeds max_position_embeddings=%d, but rope_type %s is already a scaled RoPE: left as is",
            max_seq_length, native, "/".join(sorted(types)),
        )
        return "scaled RoPE left as is"
    if types == {"dynamic"}:
        return "dynamic RoPE scales itself"
    ratio = max_seq_length / native
    for g in groups:
        kind = g.get("rope_type", g.get("type", "default"))
        if kind == "dynamic":
            continue
        g["factor"] = float(g.get("factor", 1.0) if kind == "linear" else 1.0) * ratio
        g["rope_type"] = "linear"
        g.pop("type", None)
    config.rope_parameters = params
    config.max_position_embeddings = max_seq_length
    logger.info("max_seq_length=%d > native %d: linear RoPE scaling, factor %.4g", max_seq_length, native, ratio)
    return f"linear RoPE scaling x{ratio:.4g}"


def _no_init_weights():
    """transformers' context that turns weight initialisation into no-ops (nothing to initialise on meta)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            from contextlib import nullcontext as no_init_weights
    return no_init_weights()


def build_skeleton(cls: type, config: "PretrainedConfig", dtype: "torch.dtype") -> "PreTrainedModel":
    """Instantiate ``cls(config)`` on the meta device in ``dtype``, untied, with no weight initialisation."""
    import torch

    try:
        contexts = cls.get_init_context(dtype, True, False, None)
    except (AttributeError, TypeError):  # pragma: no cover - other transformers versions
        contexts = [torch.device("meta")]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        from contextlib import ExitStack

        with ExitStack() as stack:
            for ctx in [*contexts, _no_init_weights()]:
                stack.enter_context(ctx)
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def replace_quantized_linears(
    model: "torch.nn.Module", weight_names: Mapping[str, str], settings: "QuantSettings", compute_dtype: "torch.dtype"
) -> list[str]:
    """Swap each ``nn.Linear`` whose ``<name>.weight`` the checkpoint stores quantized for a meta ``Linear4bit``.

    One walk over the modules finds the parents; the new modules are built on meta with initialisation off.
    """
    import bitsandbytes as bnb
    import torch

    storage = getattr(torch, settings.quant_storage)
    modules = dict(model.named_modules(remove_duplicate=False))
    meta = torch.device("meta")
    replaced = []
    with _no_init_weights():
        for weight_name, quant_type in weight_names.items():
            module_name = weight_name.removesuffix(".weight")
            module = modules.get(module_name)
            if module is None:
                raise LayoutMismatch(f"quantized weight {weight_name} has no module in the model")
            if type(module) is not torch.nn.Linear:
                raise LayoutMismatch(f"{module_name} is a {type(module).__name__}, not an nn.Linear")
            new = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                module.bias is not None,
                compute_dtype,
                compress_statistics=settings.double_quant,
                quant_type=quant_type,
                quant_storage=storage,
                device=meta,
            )
            if module.bias is not None:
                new.bias = module.bias  # keeps the skeleton's dtype
            new.source_cls = type(module)
            new.requires_grad_(False)
            parent_name, _, child = module_name.rpartition(".")
            setattr(modules[parent_name], child, new)
            replaced.append(module_name)
    return replaced


class LayoutMismatch(Exception):
    """The checkpoint's names do not match the model's modules (transformers would have to rename them)."""



def dtype_plan(model: Any, dtype: "torch.dtype") -> "list[tuple[Any, torch.dtype]]":
    """transformers' keep-in-fp32 rules as ``[(compiled pattern, dtype)]`` (empty for most models)."""
    import re

    get_plan = getattr(model, "_get_dtype_plan", None)
    plan = get_plan(dtype) if get_plan else {}
    return [(re.compile(k.replace("*", ".*")), v) for k, v in plan.items()]
