"""``python -m jaxcf.serve``: the command lives in ``jaxcf.cli.serve``; this name is its public entry point."""

import sys

from jaxcf.cli.serve import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
