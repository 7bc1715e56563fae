"""The ``qconv`` command line: a thin Click group; each command lives in its own module.

Commands import their heavy dependencies lazily so ``qconv --help`` stays instant. A
:class:`~qconv.errors.QconvError` becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import logging
import sys

import click

from qconv import __version__
from qconv.errors import QconvError


class _Group(click.Group):
    """A group that turns QconvError into a one-line message and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QconvError as exc:
            click.echo(f"qconv: error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qconv")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """qconv: quantize a Hugging Face causal LM once to NF4 safetensors, then load it fast."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qconv").setLevel(logging.INFO if verbose == 0 else level)


def _register() -> None:
    """Attach each command module's command (one module per command)."""
    from qconv.converter import cmd_convert, cmd_inspect, cmd_verify

    main.add_command(cmd_convert.command)
    main.add_command(cmd_verify.command)
    main.add_command(cmd_inspect.command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
