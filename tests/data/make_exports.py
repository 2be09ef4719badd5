"""Writes a small export of every model kind into ``tests/data/exports/format<N>/<kind>/`` (N: the export
format of the jaxcf that runs it), from a tiny synthetic ratings file, so that tests can check that exports
written by earlier versions still load and answer.

    python tests/data/make_exports.py          # run from the repository root; a few minutes on a CPU

Beside each, ``<kind>.answers.json`` records what the loaded export answered when it was written
(predictions for known and unknown pairs, a top-5, similar items). The exports of format 2 were written
by jaxcf 0.2.0 (main at 30c6fb0 with the split and fallback work), before the format gained its
metadata digest.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import jaxcf
from jaxcf.serving import export

HERE = Path(__file__).parent
KINDS = {
    "bias": ("bias.yaml", ["model.n_factors=4", "train.epochs=2"]),
    "dot": ("dot.yaml", ["model.n_factors=4", "train.epochs=2"]),
    "ensemble": ("bias.yaml", ["model.n_factors=4", "train.epochs=2", "ensemble.size=3"]),
    "bpmf": ("bpmf.yaml", ["model.n_factors=3", "train.epochs=6", "ensemble.size=4", "ensemble.chains=2",
                           "ensemble.burn_in=2"]),
    "ials": ("ials.yaml", ["model.n_factors=4", "train.epochs=2", "implicit.regularization=1"]),
    "bpr": ("bpr.yaml", ["model.n_factors=4", "train.epochs=2", "train.batch_size=64"]),
    "ease": ("ease.yaml", ["implicit.ease_lambda=10"]),
    "blend": ("implicit-best.yaml", ["model.n_factors=4", "train.epochs=2", "implicit.regularization=1",
                                     "implicit.ease_lambda=10"]),
}


def ratings() -> pd.DataFrame:
    """60 users, 40 items, 900 ratings in half stars, user ids integers and item ids text."""
    rng = np.random.default_rng(7)
    users = rng.integers(1, 61, 900)
    items = rng.integers(1, 41, 900)
    taste = rng.normal(size=61)[users] + rng.normal(size=41)[items]
    stars = np.clip(np.round((3.5 + taste + rng.normal(scale=0.5, size=900)) * 2) / 2, 0.5, 5.0)
    return pd.DataFrame({"userId": users, "movieId": [f"m{i:02d}" for i in items], "rating": stars})


# Pairs every model answers, known and unknown ids alike.
USERS = [1, 2, 3, 999]
ITEMS = ["m01", "m05", "m17", "zz"]


def answers(model) -> dict:
    """What the loaded export answers, recorded beside it (the compatibility test asks again)."""
    users = [u for u in USERS for _ in ITEMS]
    items = ITEMS * len(USERS)
    predicted = model.predict(users, items)
    return {"users": users, "items": items, "predictions": predicted.ratings.tolist(),
            "fallback": predicted.fallback.tolist(), "recommend_1": model.recommend(1, k=5).ids.tolist(),
            "similar_m01": model.similar_items("m01", k=3).ids.tolist()}


def main() -> int:
    target = HERE / "exports" / f"format{export.FORMAT_VERSION}"
    target.mkdir(parents=True, exist_ok=True)
    csv = target / "ratings.csv"
    ratings().to_csv(csv, index=False)
    for kind, (config, overrides) in KINDS.items():
        folder = target / kind
        if folder.exists():
            shutil.rmtree(folder)
        model = jaxcf.fit(csv, config=config, overrides=overrides, quiet=True)
        model.save(folder)
        (target / f"{kind}.answers.json").write_text(json.dumps(answers(jaxcf.load_model(folder)), indent=1) + "\n")
        print(f"{kind}: {model!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
