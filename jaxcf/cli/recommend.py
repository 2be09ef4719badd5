"""``python -m jaxcf.recommend``: the top-k unseen items for a user, by predicted rating.

    python -m jaxcf.recommend --model runs/bias --user 1 [--k 10] [--include-seen] [--strict]
    python -m jaxcf.recommend --model runs/bias --ratings history.csv --user 1001 [--save runs/folded]

An unknown user gets the flagged cold-start answer (``jaxcf.core.fallback``), or an error with ``--strict``.
With ``--ratings``, the user's ratings in that CSV are first folded into the model (``Model.fold_in``:
their factors solved from the ratings, the items frozen), so a new user gets personal recommendations
without retraining; ``--save`` keeps the folded model (in a new folder, or replacing an export). The
file has the model's item and rating columns (its training config's, e.g. ``movieId,rating``); a user
column is optional, and when present every row must name ``--user``.

What does not live here: the inference itself (``jaxcf.serving.inference``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jaxcf.cli import common as cli
from jaxcf.core.errors import ModelError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.recommend", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training workdir or an exported model folder")
    parser.add_argument("--user", required=True, help="raw user id (as in the ratings file)")
    parser.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--include-seen", action="store_true", help="also rank items the user rated in training")
    parser.add_argument("--strict", action="store_true", help="fail for an unknown user instead of the cold start")
    parser.add_argument("--ratings", help="a CSV of the user's (item, rating) rows to fold in first, with the "
                        "training config's column names (e.g. movieId,rating); a user column is optional")
    parser.add_argument("--save", help="with --ratings: write the folded model here (an export folder)")
    return parser.parse_args(argv)


def user_ratings(model, path: str, user: str):
    """The ratings of ``--user`` from ``path``: the model's item and rating columns, and its user column
    filled with ``user`` where the file has none.

    Raises:
      ModelError: an unreadable file, or a user column that names someone else.
    """
    from jaxcf.serving.foldin import ratings_frame

    user_col, item_col, rating_col = cols = model.columns()
    frame = ratings_frame(path, cols)
    if user_col not in frame.columns:
        return frame.assign(**{user_col: user})
    named = frame[user_col].astype(str)
    others = sorted(set(named[named != str(user)].tolist()))
    if others:
        raise ModelError(f"{path}: its {user_col} column names user(s) {', '.join(others[:3])}, not --user {user}; "
                         f"give a file of {user}'s ratings ({item_col},{rating_col}; a {user_col} column is optional)")
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.k < 1:
            raise ValueError(f"--k must be >= 1; got {args.k}")
        if args.save and not args.ratings:
            raise ValueError("--save keeps a folded model: give --ratings too")
        if args.save:
            from jaxcf.serving.export import check_target

            check_target(args.save)  # before any work: --save never replaces what jaxcf did not write
        model = cli.load_model(args.model)
        if args.ratings:
            model = model.fold_in(user_ratings(model, args.ratings, args.user))
            report = model.fold_in_report
            unknown = (f"; {report.unknown_item_ratings} rating(s) of {len(report.unknown_items)} item(s) the model "
                       f"does not know were not used: {', '.join(map(str, report.unknown_items[:5]))}"
                       if report.unknown_items else "")
            low = (f"; {report.below_threshold} rating(s) under the model's interaction threshold were not used"
                   if report.below_threshold else "")
            print(f"folded in user {args.user} ({'new' if report.users_added else 'known'}) from "
                  f"{args.ratings}{unknown}{low}")
            if args.save:
                print(f"saved the folded model to {model.save(args.save)}")
        ranking = model.recommend(args.user, k=args.k, exclude_seen=not args.include_seen, strict=args.strict)
        if model.metadata["model"].get("feedback") == "implicit":  # scores that only order items
            rows, order, column, mean, verb = "interactions", "score", "score", "score", "interacted with"
        else:
            rows, order, column, mean, verb = "ratings", "predicted rating", "predicted", "prediction", "rated"
        if ranking.fallback:
            how = "learned item bias" if model.spec.cold_start_by_bias else f"number of training {rows}"
            print(
                f"user {args.user} is unknown to the model: cold-start answer (fallback), items ranked by {how}; "
                f"{column} = the mean {mean} over the item's training {rows}"
            )
        else:
            index = int(model.lookup_users(args.user)[0][0])
            seen = "" if args.include_seen else f", excluding the {len(model.seen(index))} items they {verb}"
            print(f"top {len(ranking.ids)} for user {args.user} by {order}{seen}")
        print(cli.format_ranking(ranking, column))
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
