"""``python -m jaxcf.crossval``: the command lives in ``jaxcf.cli.crossval``; this name is its public entry point."""

import sys

from jaxcf.cli.crossval import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
