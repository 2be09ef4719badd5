"""``python -m jaxcf.predict``: the predicted rating (or an implicit-feedback model's score) of one user for
one item, from an exported model.

    python -m jaxcf.predict --model runs/bias --user 1 --item 31 [--strict] [--fallback mean|known_terms]

An unknown user or item gets the documented fallback (``jaxcf.core.fallback``), and the output says so;
``--strict`` makes it an error instead (exit status 2). Ids are matched exactly as written.

What does not live here: the inference itself (``jaxcf.serving.inference``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxcf.cli import common as cli
from jaxcf.serving.inference import FALLBACKS


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training workdir or an exported model folder")
    parser.add_argument("--user", required=True, help="raw user id (as in the ratings file)")
    parser.add_argument("--item", required=True, help="raw item id (as in the ratings file)")
    parser.add_argument("--strict", action="store_true", help="fail for an unknown id instead of falling back")
    parser.add_argument(
        "--fallback", choices=FALLBACKS, default="mean",
        help="rule for unknown ids: mean (default) or known_terms (Surprise's literal rule)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        model = cli.load_model(args.model)
        result = model.predict([args.user], [args.item], strict=args.strict, fallback=args.fallback)
        rating = float(result.ratings[0])
        title = model.title(args.item)
        item = f"item {args.item}" + (f" ({title})" if title else "")
        # An implicit-feedback model's score orders items; it is not a rating.
        what = "score" if model.feedback == "implicit" else "predicted rating"
        line = f"user {args.user}, {item}: {what} {rating:.4f}"
        if result.fallback[0]:
            user_known, item_known = bool(result.user_known[0]), bool(result.item_known[0])
            unknown = " and ".join(what for what, known in (("user", user_known), ("item", item_known)) if not known)
            rule = model.fallback_rule(user_known, item_known)
            if args.fallback == "known_terms" and model.has_biases:
                rule = "scaled sigmoid of the known biases"
            line += f" (fallback: unknown {unknown}; {rule})"
        print(line)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
