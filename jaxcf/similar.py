"""``python -m jaxcf.similar``: the command lives in ``jaxcf.cli.similar``; this name is its public entry point."""

import sys

from jaxcf.cli.similar import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
