"""``python -m jaxcf.similar``: the items closest to one item, by cosine similarity of embeddings.

    python -m jaxcf.similar --model runs/bias --item 260 [--k 10] [--min-ratings 1]

An unknown item is an error (exit status 2): similarity has no fallback.

What does not live here: the computation (``jaxcf.serving.inference.Model.similar_items``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxcf.cli import common as cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.similar", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training workdir or an exported model folder")
    parser.add_argument("--item", required=True, help="raw item id (as in the ratings file)")
    parser.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument(
        "--min-ratings", type=int, default=1,
        help="skip items with fewer training ratings (default 1: an unrated item's embedding is its random init)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.k < 1:
            raise ValueError(f"--k must be >= 1; got {args.k}")
        model = cli.load_model(args.model)
        ranking = model.similar_items(args.item, k=args.k, min_ratings=args.min_ratings)
        title = model.title(args.item)
        about = f"item {args.item}" + (f" ({title})" if title else "")
        print(f"{len(ranking.ids)} items most similar to {about}, by cosine of item embeddings")
        print(cli.format_ranking(ranking, "cosine"))
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
