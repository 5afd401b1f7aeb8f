"""``python -m thinkcap.proxy`` runs the thinkcap CLI."""

import sys

from thinkcap.proxy.cli import main

sys.exit(main())
