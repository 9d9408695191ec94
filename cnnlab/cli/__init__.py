"""The command line: parses arguments, calls the package, renders results and errors.

Every user mistake surfaces as a `CnnlabError`, printed here as one line
(`cnnlab: error: ...`) with exit status 2. Nothing in the package imports this module.

Each command group lives in its own module with an `add_commands(subparsers)`;
`COMMAND_GROUPS` lists them in the order `cnnlab --help` shows them.
"""

from __future__ import annotations

import sys
import warnings
from typing import Sequence

from cnnlab import __version__
from cnnlab.cli import compress, inspect, shipping, tools, train
from cnnlab.cli.common import Parser
from cnnlab.errors import CnnlabError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

COMMAND_GROUPS = (train, tools, inspect, compress, shipping)


def build_parser() -> Parser:
    parser = Parser(prog="cnnlab", description="Train, inspect and ship convolutional image classifiers.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = parser.parse_args(argv)
            status = args.handler(args) or 0
            sys.stdout.flush()  # a closed pipe shows here, not at exit as an unraisable error
            return status
    except CnnlabError as exc:
        print(f"cnnlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`cnnlab models | head`): stop quietly. stdout is pointed at
        # devnull so that the flush at exit does not fail again (the recipe in Python's signal docs).
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as exc:
        # cnnlab is exiting: a further Ctrl-C must not cut the line below or turn the exit status
        # into death by signal (training has already put the default handler back).
        # Not put back: main() is the command line's entry point, and the process ends on return.
        import signal

        if hasattr(exc, "exit_status"):  # a signal training caught (loop.Interrupted)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Training raises loop.Interrupted, which says where the run stopped and how to continue it.
        print(f"cnnlab: {exc}" if str(exc) else "cnnlab: interrupted", file=sys.stderr)
        return getattr(exc, "exit_status", EXIT_INTERRUPTED)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"cnnlab: warning: {message}", file=sys.stderr)



if __name__ == "__main__":
    sys.exit(main())
