"""``python -m jaxcf.sweep``: the command lives in ``jaxcf.cli.sweep``; this name is its public entry point."""

import sys

from jaxcf.cli.sweep import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
