"""Per-model-family patches that swap in qconv kernels."""
