"""``python -m proxy`` runs the thinkcap CLI."""

import sys

from proxy.cli import main

sys.exit(main())
