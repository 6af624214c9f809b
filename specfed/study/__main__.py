"""`python -m specfed.study FILE ...`: see `specfed.study.run`."""

import sys

from specfed.study.run import main

sys.exit(main())
