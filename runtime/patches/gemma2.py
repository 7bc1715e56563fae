"""Gemma 2: RMSNorm scaled by (1 + weight), GeGLU (tanh) MLP, RoPE in attention, cross-entropy.

The final-logit soft-capping happens in the model's forward before the loss, so the loss needs none.
"""

from qconv.runtime.patches import FamilyPatch, register

PATCH = register(
    FamilyPatch(
        model_types=("gemma2",),
        modeling_module="transformers.models.gemma2.modeling_gemma2",
        rms_norm="Gemma2RMSNorm",
        rms_norm_eps_attr="eps",
        rms_norm_offset=1.0,
        mlp="Gemma2MLP",
        activation_attr="hidden_activation",
        attention="Gemma2Attention",
    )
)
