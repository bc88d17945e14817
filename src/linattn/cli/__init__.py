"""Command line: ``linattn <subcommand>`` (also ``python -m linattn``).

One module per command (:mod:`.bench`, :mod:`.approx`, :mod:`.convert`, :mod:`.train`,
:mod:`.report`, :mod:`.evaluate` for `eval`), each exposing ``COMMAND``, a :class:`~._common.Command`: its name,
help and description, ``configure(parser)`` (adds its arguments) and ``run(args) ->
int`` (does the work, returns the exit code). :mod:`._common` holds what they share:
argument types, the ``--out`` check, ``--config`` reading and the error handling.

Adding a command is one line in :data:`COMMANDS`: a module's ``COMMAND``, or for a
function pair elsewhere ``Command("eval", help, description, configure_parser,
run_from_args)``. :func:`build_parser` gives every command ``--debug`` and this
package's help format.

Errors a user can act on end in one line on stderr, ``linattn <command>: error: ...``:
exit code 2 for a bad command line (an invalid value, a missing or malformed
``--config``, an ``--out`` folder that cannot be written: all checked before any work
starts), 1 for a failure during the work (a missing corpus or model package, a file
that cannot be read or written). ``--debug`` (or ``LINATTN_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from . import approx, bench, convert, evaluate, report, train
from ._common import (
    Command,
    Context,
    HelpFormatter,
    Parser,
    UsageError,
    debug_requested,
    run_command,
    version,
)

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "main"]

#: The subcommands, in ``linattn --help``'s order.
COMMANDS: tuple[Command, ...] = (
    bench.COMMAND,
    approx.COMMAND,
    convert.COMMAND,
    train.COMMAND,
    report.COMMAND,
    evaluate.COMMAND,
)


_BY_NAME = {command.name: command for command in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="linattn",
        formatter_class=HelpFormatter,
        description="Linear-time attention (Performer FAVOR+, Linformer): benchmarks, "
        "training, conversion of pretrained Hugging Face models. Errors print one line; "
        "--debug (or LINATTN_DEBUG=1) shows the traceback.",
    )
    parser.add_argument("--version", action="version", version=f"linattn {version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands (linattn COMMAND --help for each)"
    )
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            formatter_class=HelpFormatter,
            help=command.help,
            description=command.description,
        )
        # SUPPRESS: `linattn --debug train` is not reset by the subcommand's default.
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of an error",
        )
        command.configure(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    context = Context()

    def work() -> int:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        context.prog = f"linattn {args.command}"
        context.sizes = _BY_NAME[args.command].sizes
        return args.func(args)

    return run_command(work, debug=debug_requested(argv), context=context)


if __name__ == "__main__":
    sys.exit(main())
