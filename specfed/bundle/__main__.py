"""`python -m specfed.bundle`: see specfed.bundle.cli."""

import sys

from specfed.bundle.cli import main

if __name__ == "__main__":
    sys.exit(main())
