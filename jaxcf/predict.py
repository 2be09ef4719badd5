"""``python -m jaxcf.predict``: the command lives in ``jaxcf.cli.predict``; this name is its public entry point."""

import sys

from jaxcf.cli.predict import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
