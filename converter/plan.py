"""Decide, per source tensor, whether it is quantized, kept (cast), or dropped, the way transformers would.

transformers itself answers the question: a skeleton of the model is built on the meta device, its own
bitsandbytes quantizer replaces the Linear layers it would quantize (``preprocess_model`` with the
``BitsAndBytesConfig`` of the settings), and the result tells which weights become 4-bit, which stay in
which dtype (``_keep_in_fp32_modules`` included), and which keys ``save_pretrained`` writes (tied weights
are written once). Nothing here reads tensor data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from qconv.converter.checkpoint import TensorInfo
from qconv.errors import QconvError
from qconv.format import QuantSettings, is_state_tensor

logger = logging.getLogger(__name__)

QUANTIZE, KEEP, DROP = "quantize", "keep", "drop"

#: Tensor-name endings that only pre-quantized checkpoints carry (GPTQ/AWQ, fp8, bnb 8-bit).
_QUANTIZED_MARKERS = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_scale_inv",
                      ".input_scale", ".SCB", ".weight_format")


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one source tensor."""

    source_name: str
    out_name: str
    action: str  # QUANTIZE | KEEP | DROP
    dtype: torch.dtype | None  # quantize: the dtype the weight is cast to first; keep: the stored dtype


@dataclass
class Plan:
    """The per-tensor decisions, in source read order, plus facts the converter reports."""

    tensors: list[TensorPlan]
    model_class: str
    hf_config: Any = None  # the transformers config object the skeleton was built from
    skip_modules: list[str] = field(default_factory=list)

    def by_action(self, action: str) -> list[TensorPlan]:
        return [t for t in self.tensors if t.action == action]


def refuse_quantized_source(config: Mapping[str, Any], infos: Mapping[str, TensorInfo], where: str) -> None:
    """Raise when the source is already quantized (bnb, GPTQ, AWQ, fp8, compressed-tensors...): never twice."""
    for key in ("quantization_config", "compression_config"):
        qc = config.get(key)
        if qc:
            method = qc.get("quant_method", "unknown") if isinstance(qc, Mapping) else "unknown"
            raise QconvError(
                f"{where}: the source is already quantized ({key}.quant_method={method!r}); "
                "convert the original full-precision checkpoint instead"
            )
    for name, info in infos.items():
        if is_state_tensor(name) or name.endswith(_QUANTIZED_MARKERS) or "float8" in str(info.dtype):
            raise QconvError(
                f"{where}: the source is already quantized (tensor {name!r}, {info.dtype}); "
                "convert the original full-precision checkpoint instead"
            )


def transformers_config(config: Mapping[str, Any], where: str):
    """A transformers config object for a causal LM, or a QconvError saying why not."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto as auto

    model_type = config.get("model_type")
    if not model_type or model_type not in CONFIG_MAPPING:
        import transformers

        raise QconvError(
            f"{where}: config.json model_type {model_type!r} is not known to transformers {transformers.__version__} "
            "(custom code is never run; upgrade transformers if the architecture is new)"
        )
    cfg = CONFIG_MAPPING[model_type].from_dict(dict(config))
    if type(cfg) not in auto.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise QconvError(f"{where}: model_type {model_type!r} is not a causal language model (AutoModelForCausalLM has no class for it)")
    # Encoders (BERT, RoBERTa...) and encoder-decoders also have a *ForCausalLM head class in transformers,
    # but a checkpoint of theirs is not a decoder-only LM unless its config says is_decoder.
    encoders = set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    if model_type in encoders and not config.get("is_decoder", False):
        raise QconvError(f"{where}: model_type {model_type!r} is an encoder model, not a causal language model")
    return cfg


def build_skeleton(hf_config, settings: QuantSettings):
    """The model on the meta device after transformers' bnb quantizer replaced the Linears it quantizes."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    dtype = getattr(torch, settings.compute_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as in from_pretrained: new modules (Linear4bit biases) get this dtype
    try:
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
            except TypeError:  # older transformers spell it torch_dtype
                model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=dtype)
            quantizer = AutoHfQuantizer.from_config(settings.bnb_config(), pre_quantized=False)
            try:
                quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None,
                                           use_kernels=False)
            except TypeError:  # keyword set differs between transformers versions
                quantizer.preprocess_model(model=model, device_map={"": "cpu"})
    finally:
        torch.set_default_dtype(previous)
    return model, quantizer


def _tied_targets(model) -> set[str]:
    """Keys ``save_pretrained`` leaves out because they are tied to another parameter."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, Mapping):
        return set(tied.keys())
    if getattr(model.config, "tie_word_embeddings", False):  # pragma: no cover - transformers < 5
        return set(getattr(model, "_tied_weights_keys", None) or [])
    return set()  # pragma: no cover


def _dtype_plan(model, dtype: torch.dtype) -> list[tuple[re.Pattern, torch.dtype]]:
    getter = getattr(model, "_get_dtype_plan", None)
    plan = getter(dtype) if getter is not None else {}
    return [(re.compile(str(k).replace("*", ".*")), v) for k, v in (plan or {}).items()]


def build_plan(config: Mapping[str, Any], infos: Mapping[str, TensorInfo], settings: QuantSettings,
               where: str = "source") -> Plan:
    """Plan every source tensor; raise when the checkpoint lacks a tensor the model needs."""
    import bitsandbytes as bnb

    refuse_quantized_source(config, infos, where)
    hf_config = transformers_config(config, where)
    model, quantizer = build_skeleton(hf_config, settings)
    compute = getattr(torch, settings.compute_dtype)
    quantized = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    state = model.state_dict(keep_vars=True)
    tied = _tied_targets(model)
    expected = {k: v for k, v in state.items() if k not in tied}
    dtype_rules = _dtype_plan(model, compute)
    prefix = getattr(model, "base_model_prefix", "") or ""

    def out_name(source_name: str) -> str | None:
        if source_name in expected:
            return source_name
        if prefix and f"{prefix}.{source_name}" in expected:  # a base-model checkpoint without the prefix
            return f"{prefix}.{source_name}"
        return None

    tensors: list[TensorPlan] = []
    seen: set[str] = set()
    for name, info in infos.items():
        target = out_name(name)
        if target is None or target in seen:
            tensors.append(TensorPlan(name, name, DROP, None))
            continue
        seen.add(target)
        if target in quantized:
            tensors.append(TensorPlan(name, target, QUANTIZE, compute))
            continue
        dtype = expected[target].dtype
        for pattern, forced in dtype_rules:
            if pattern.search(target):
                dtype = forced
                break
        if not info.dtype.is_floating_point:
            dtype = info.dtype
        tensors.append(TensorPlan(name, target, KEEP, dtype))
    missing = sorted(k for k, v in expected.items() if k not in seen and isinstance(v, torch.nn.Parameter))
    if missing:
        raise QconvError(
            f"{where}: checkpoint lacks {len(missing)} tensor(s) {type(model).__name__} needs, e.g. "
            f"{', '.join(missing[:3])} (unsupported checkpoint layout?)"
        )
    dropped = [t.source_name for t in tensors if t.action == DROP]
    if dropped:
        logger.info("not written (tied or unused by %s): %s", type(model).__name__, ", ".join(dropped[:8]))
    skip = sorted(getattr(quantizer, "modules_to_not_convert", None) or [])
    return Plan(tensors=tensors, model_class=type(model).__name__, hf_config=hf_config, skip_modules=skip)
