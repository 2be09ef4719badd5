"""The fallback policy measured: how well each rule answers for an id the model has never seen.

    python bench/fallback.py [--json results/fallback.json]

Trains ``configs/bias.yaml`` (in memory), then scores every validation rating of the bundled split as
if its user, its item, or both were unknown, with the policy of ``jaxcf.core.fallback`` (the model's mean
prediction over the known side's training pairs) and with Surprise's literal "known terms only"
(``sigmoid(known bias)`` scaled to the range; the midpoint when both are unknown). For scale: the
model itself with both ids known, and a constant mean training rating.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from jaxcf import config, data
    from jaxcf.serving.inference import Model
    from jaxcf.training import api

    cfg = config.load("bias.yaml")
    dataset = data.load(cfg.data, cfg.seed)
    with open(os.devnull, "w") as silent:
        model = Model(api.run(cfg, dataset, quiet=True, out=silent).export())
    r, valid, train = dataset.ratings, dataset.split.valid, dataset.split.train
    users, items, y = r.users[valid], r.items[valid], r.ratings[valid].astype(np.float64)
    low, high = model.y_range

    def scaled(logit):
        return 1 / (1 + np.exp(-logit)) * (high - low) + low

    def rmse(predictions):
        return float(np.sqrt(np.mean((np.asarray(predictions, np.float64) - y) ** 2)))

    tables = model.fallback_tables
    rows = {
        "unknown user": {"known_terms": rmse(scaled(model.item_bias[items])), "policy": rmse(tables.per_item[items])},
        "unknown item": {"known_terms": rmse(scaled(model.user_bias[users])), "policy": rmse(tables.per_user[users])},
        "both unknown": {"known_terms": rmse(np.full_like(y, (low + high) / 2)),
                         "policy": rmse(np.full_like(y, tables.overall))},
    }
    reference = {"model, both known": rmse(model.predict(r.user_ids.raw[users], r.item_ids.raw[items]).ratings),
                 "constant mean training rating": rmse(np.full_like(y, r.ratings[train].mean()))}
    for name, row in rows.items():
        print(f"{name:<14} known terms RMSE {row['known_terms']:.4f}   policy RMSE {row['policy']:.4f}")
    for name, value in reference.items():
        print(f"{name:<30} RMSE {value:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows,
                                         "reference": reference, "machine": machine.describe("jax")}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
