"""Qwen2: RMSNorm, SwiGLU MLP, RoPE in attention, cross-entropy."""

from qconv.runtime.patches import FamilyPatch, register

PATCH = register(
    FamilyPatch(
        model_types=("qwen2",),
        modeling_module="transformers.models.qwen2.modeling_qwen2",
        rms_norm="Qwen2RMSNorm",
        mlp="Qwen2MLP",
        attention="Qwen2Attention",
    )
)
