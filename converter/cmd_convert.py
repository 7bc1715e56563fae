"""``qconv convert``: placeholder until the converter lands (issue 2)."""

import click


@click.command("convert")
@click.argument("source")
def command(source: str) -> None:
    """Convert SOURCE to an NF4 checkpoint (not implemented yet)."""
    raise click.ClickException("qconv convert is not implemented yet")
