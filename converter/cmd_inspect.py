"""``qconv inspect DIR [--json]``: summarise a converted checkpoint from headers only."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def command(directory: str, as_json: bool) -> None:
    """Describe DIRECTORY: architecture, parameters, quantized/kept tensors, size, settings, fixes."""
    from qconv.converter.inspect_checkpoint import format_table, inspect_checkpoint

    info = inspect_checkpoint(directory)
    click.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else format_table(info))
