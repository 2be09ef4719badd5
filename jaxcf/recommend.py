"""``python -m jaxcf.recommend``: the top-k unseen items for a user, by predicted rating.

    python -m jaxcf.recommend --model runs/bias --user 1 [--k 10] [--include-seen] [--strict]

An unknown user gets the flagged cold-start answer (``jaxcf.fallback``), or an error with ``--strict``.

What does not live here: the inference itself (``jaxcf.inference``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxcf import cli
from jaxcf.inference import load_model


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.recommend", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training workdir or an exported model folder")
    parser.add_argument("--user", required=True, help="raw user id (as in the ratings file)")
    parser.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--include-seen", action="store_true", help="also rank items the user rated in training")
    parser.add_argument("--strict", action="store_true", help="fail for an unknown user instead of the cold start")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.k < 1:
            raise ValueError(f"--k must be >= 1; got {args.k}")
        model = load_model(args.model)
        ranking = model.recommend(args.user, k=args.k, exclude_seen=not args.include_seen, strict=args.strict)
        if ranking.fallback:
            how = "learned item bias" if model.kind == "bias" else "number of training ratings"
            print(
                f"user {args.user} is unknown to the model: cold-start answer (fallback), items ranked by {how}; "
                "predicted = the mean prediction over the item's training ratings"
            )
        else:
            index = int(model.lookup_users(args.user)[0][0])
            seen = "" if args.include_seen else f", excluding the {len(model.seen(index))} items they rated in training"
            print(f"top {len(ranking.ids)} for user {args.user} by predicted rating{seen}")
        print(cli.format_ranking(ranking, "predicted"))
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
