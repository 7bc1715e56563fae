"""Mistral: RMSNorm, SwiGLU MLP, RoPE in attention, cross-entropy."""

from qconv.runtime.patches import FamilyPatch, register

PATCH = register(
    FamilyPatch(
        model_types=("mistral",),
        modeling_module="transformers.models.mistral.modeling_mistral",
        rms_norm="MistralRMSNorm",
        mlp="MistralMLP",
        attention="MistralAttention",
    )
)
