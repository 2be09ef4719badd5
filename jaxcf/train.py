"""``python -m jaxcf.train``: the command lives in ``jaxcf.cli.train``; this name is its public entry point."""

import sys

from jaxcf.cli.train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
