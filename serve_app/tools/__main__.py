"""Model tools: ``python -m serve_app.tools <command> ...``; ``<command> --help`` for each."""

from __future__ import annotations

import argparse
from typing import Protocol

from serve_app.tools import build_trt, export, quantize
from serve_app.tools.model_dir import ModelDirError


class Command(Protocol):
    """A command module: its docstring's first line is its help."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> None: ...


COMMANDS: dict[str, Command] = {"export": export, "quantize": quantize, "build-trt": build_trt}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(prog="python -m serve_app.tools", description=__doc__)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        doc = command.__doc__ or name
        subparser = subcommands.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` and run the command; bad input exits with status 2 and a one-line reason.

    A failed export (tracing, or the self-check against torch) exits with status 1 and its
    reason, not a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ModelDirError as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    except export.ExportError as error:
        parser.exit(1, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
