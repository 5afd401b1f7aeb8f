"""The ``thinkcap`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from thinkcap.cli import audit, calibrate, demo, extproc, fit, report, serve, sim, solve
from thinkcap.proxy.toml_reader import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="thinkcap", description="Queueing-aware reasoning-token caps for LLM servers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    solve.add_parser(sub)
    fit.add_parser(sub)
    sim.add_parsers(sub)
    serve.add_parser(sub)
    extproc.add_parser(sub)
    audit.add_parser(sub)
    demo.add_parser(sub)
    report.add_parser(sub)
    calibrate.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; configuration and usage errors exit 2 with one line, no traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"thinkcap: config error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"thinkcap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Only standard output gets here (the servers handle their sockets' own broken
        # pipes): its reader left early (``thinkcap audit LOG | head``). Point it at
        # /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # as if killed by SIGPIPE, like other tools whose reader left early
    return code


if __name__ == "__main__":
    sys.exit(main())
