"""``python -m thinkcap.cli`` runs the thinkcap command line."""

import sys

from thinkcap.cli import main

sys.exit(main())
