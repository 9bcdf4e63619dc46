"""`python -m dsv2.serve ...` = `dsv2 serve ...`."""

import sys

from dsv2.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
