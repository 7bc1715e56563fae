"""The qconv converter: the `qconv` CLI and the pipeline it drives (source -> NF4 checkpoint)."""
