"""The qconv runtime: load pre-quantized NF4 checkpoints straight onto the device."""
