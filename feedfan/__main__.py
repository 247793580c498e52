"""``python -m feedfan`` runs the ``feedfan`` command."""

import sys

from feedfan.cli import main

sys.exit(main())
