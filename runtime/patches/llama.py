"""Llama: RMSNorm, SwiGLU MLP, RoPE in attention, cross-entropy."""

from qconv.runtime.patches import FamilyPatch, register

PATCH = register(
    FamilyPatch(
        model_types=("llama",),
        modeling_module="transformers.models.llama.modeling_llama",
        rms_norm="LlamaRMSNorm",
        mlp="LlamaMLP",
        attention="LlamaAttention",
    )
)
