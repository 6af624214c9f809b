"""`python -m specfed.bundle`: see specfed.bundle.cli."""

import sys

from specfed.bundle.cli import main

sys.exit(main())
