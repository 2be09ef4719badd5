"""``python -m jaxcf.recommend``: the command lives in ``jaxcf.cli.recommend``; this name is its public entry point."""

import sys

from jaxcf.cli.recommend import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
