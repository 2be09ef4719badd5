"""``python -m jaxcf.report``: the command lives in ``jaxcf.cli.report``; this name is its public entry point."""

import sys

from jaxcf.cli.report import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
