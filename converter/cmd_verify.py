"""``qconv verify DIR [--source SRC]``: check a converted checkpoint's integrity (and accuracy vs its source)."""

from __future__ import annotations

import sys

import click


@click.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--source", default=None, help="Source checkpoint directory to compare dequantized weights against.")
def command(directory: str, source: str | None) -> None:
    """Verify DIRECTORY: file hashes, quant-state tensors, config; with --source, dequantization error."""
    from qconv.converter.verify import verify_checkpoint

    report = verify_checkpoint(directory, source=source)
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)
