"""``python -m jaxcf.evaluate``: the command lives in ``jaxcf.cli.evaluate``; this name is its public entry point."""

import sys

from jaxcf.cli.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
