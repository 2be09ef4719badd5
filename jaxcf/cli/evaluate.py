"""``python -m jaxcf.evaluate``: a saved model's metrics on a ratings file (yours, or a held-out part).

    python -m jaxcf.evaluate --model runs/bias --ratings test.csv [--json metrics.json]
                             [--user-col userId --item-col movieId --rating-col rating]

The file is read with the model's own column names by default (its training config's ``data.*_col``),
its ids matched exactly as the model's, and scored by the code that scores a run's validation and test
parts (``Model.evaluate``, ``jaxcf.serving.heldout``): for a rating model ``rmse``, ``mae``, ``mse`` over every
row answered as ``predict`` answers it (fallbacks included, flagged in ``rows_fallback``), ``rmse_known``
over the rows whose ids were trained, ``rows``, ``rows_known`` and the ranking metrics; for an
implicit-feedback model the ranking metrics of its protocol. Trained with ``data.test_path`` set to the
same file, ``rmse`` equals the run's last ``test_rmse``.

Exit status: 0 done; 2 bad input (one line on stderr; nothing written).

What does not live here: the metrics (``jaxcf.core.metrics``, ``jaxcf.serving.heldout``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxcf.cli import common as cli
from jaxcf.core.errors import ModelError
from jaxcf.core.fileio import atomic_write_text, strict_json

SHOWN = ("rmse", "mae", "rmse_known", "precision@10", "recall@10", "ndcg@10")
SHOWN_IMPLICIT = ("ndcg@20", "recall@20", "map@20", "mrr", "hit@20", "coverage@20")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training workdir or an exported model folder")
    parser.add_argument("--ratings", required=True, help="a CSV of (user, item, rating) rows")
    parser.add_argument("--json", type=Path, help="also write every metric to this JSON file")
    parser.add_argument("--user-col", help="the user column (default: the model's data.user_col)")
    parser.add_argument("--item-col", help="the item column (default: the model's data.item_col)")
    parser.add_argument("--rating-col", help="the rating column (default: the model's data.rating_col)")
    return parser.parse_args(argv)


def format_metrics(found: dict, implicit: bool) -> str:
    """The printed summary: counts, then one metric per line."""
    if implicit:
        lines = [f"{found['rows']} rows, {found['rows_interactions']} interactions (rating >= "
                 f"{found['implicit_threshold']:g}), {found['scored_users']} users scored"]
        names = SHOWN_IMPLICIT
    else:
        lines = [f"{found['rows']} rows: {found['rows_known']} with a trained user and item, "
                 f"{found['rows_fallback']} answered by the fallback"]
        names = SHOWN
    for name in names:
        value = found.get(name)
        if isinstance(value, float) and math.isfinite(value):
            lines.append(f"{name:>12}  {value:.6f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if args.json is not None and (args.json.is_dir() or args.json.is_symlink()):
            raise ModelError(f"--json {args.json}: is a directory or a link; give a new file name")
        model = cli.load_model(args.model)
        found = model.evaluate(args.ratings, user_col=args.user_col, item_col=args.item_col,
                               rating_col=args.rating_col)
        print(f"{model.kind} model {model.path} on {args.ratings}")
        print(format_metrics(found, model.feedback == "implicit"))
        if args.json is not None:
            payload = {"model": str(model.path), "ratings": str(args.ratings), "kind": model.kind, **found}
            try:
                atomic_write_text(args.json, json.dumps(strict_json(payload), indent=2) + "\n")
            except OSError as err:
                raise ModelError(f"--json {args.json}: cannot write it ({err.strerror})") from None
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
