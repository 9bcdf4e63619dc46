"""`python -m dsv2.train ...` (also what torchrun launches)."""

import sys

from dsv2.train.cli import main

sys.exit(main())
