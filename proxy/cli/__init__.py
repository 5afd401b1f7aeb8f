"""The ``thinkcap`` command line: one module per subcommand (nothing else imports this room)."""

from thinkcap.proxy.cli.main import main

__all__ = ["main"]
