"""The notebook's biased model under each optimizer jaxcf offers: validation RMSE after 5 epochs and
seconds per epoch, one run each on the bundled split (the README's "adam vs adamw" table).

    python bench/optimizers.py [--json results/optimizers.json]

Each row is ``python -m jaxcf.train --config configs/bias.yaml --set <overrides>`` run in this process
through ``jaxcf.training.loop.fit`` (the same code path), seed 42. ``epoch_s`` is the median of epochs 2-5
(validation included; the first compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROWS = {
    "adamw, wd 1e-4 (configs/bias.yaml)": [],
    "adamw, wd 0": ["optim.weight_decay=0"],
    "adamw, wd 0.1": ["optim.weight_decay=0.1"],
    "adamw, wd 0.5": ["optim.weight_decay=0.5"],
    "adam, coupled L2 1e-4 (the notebook's)": ["optim.name=adam"],
    "lazy_adam (row-sparse), wd 1e-4": ["optim.name=lazy_adam"],
    "dot model, adamw wd 0 (configs/dot.yaml)": ["CONFIG=dot.yaml"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from jaxcf import config
    from jaxcf.training import api

    rows = []
    load_before = machine.load_average()
    for name, overrides in ROWS.items():
        config_name = next((o.split("=", 1)[1] for o in overrides if o.startswith("CONFIG=")), "bias.yaml")
        sets = [o for o in overrides if not o.startswith("CONFIG=")]
        cfg = config.load(config_name, sets)
        with open(os.devnull, "w") as silent:
            history = api.run(cfg, quiet=True, out=silent).history
        epochs = list({r["epoch"]: r for r in history}.values())
        row = {"setting": name, "config": config_name, "overrides": sets, "valid_rmse": history[-1]["valid_rmse"],
               "valid_rmse_per_epoch": [r["valid_rmse"] for r in epochs],
               "epoch_s": statistics.median(r["seconds"] for r in epochs[1:])}
        rows.append(row)
        print(f"{name:<44} valid RMSE {row['valid_rmse']:.4f}   {row['epoch_s']:.2f} s/epoch", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows,
            "load_average_before": load_before, "load_average_after": machine.load_average(),
            "machine": machine.describe("jax", "jaxlib", "optax"),
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
