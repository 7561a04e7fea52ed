"""Shim: ``python cli.py ...`` does what ``safeinfer ...`` does."""

import sys

from safeinfer_local.cli import main

if __name__ == "__main__":
    sys.exit(main())
