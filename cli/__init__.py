"""The ``thinkcap`` command line: one module per subcommand (nothing else imports this room)."""

from thinkcap.cli.main import main

__all__ = ["main"]
