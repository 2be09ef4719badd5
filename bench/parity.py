"""Parity report: jaxcf and the PyTorch port of the notebook, trained side by side.

    python bench/parity.py [--json PATH] [--epochs 5] [--seed 42] [--cases dot-adamw bias-adamw bias-adam]

For each notebook config (``dot.yaml``: adamw with weight decay 0, which is the notebook's Adam;
``bias.yaml``: adamw 1e-4; ``bias.yaml`` with ``optim.name=adam``: the notebook's Adam with coupled
L2 1e-4) both implementations start from the same weights (drawn by PyTorch, copied into jaxcf) and
see the same batches in the same order (``torch.randperm`` per epoch, the last partial batch
included). Per epoch it prints the debiased training loss and the validation RMSE of each side and
the max |difference| of their validation predictions, and writes all of it as JSON with ``--json``.
Takes ~2 minutes on an idle 2-core CPU (PyTorch's loop is ~6 s an epoch, jaxcf's ~0.5 s).

What does not live here: the pass/fail parity checks (``tests/test_parity.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
import torch.nn as nn

from jaxcf import config as jconfig
from jaxcf import data as jdata
from jaxcf.core import metrics as jevaluate
from jaxcf.families.sgd import fit as jsgd
from jaxcf.training import loop as jtrainer
from reference_torch import notebook as nb
from reference_torch import weights as W
from reference_torch.train import build_model, build_optimizer

CASES = {
    "dot-adamw": ("dot.yaml", []),
    "bias-adamw": ("bias.yaml", []),
    "bias-adam": ("bias.yaml", ["optim.name=adam"]),
}


def run_case(name: str, dataset, data, epochs: int, seed: int) -> dict:
    """Trains both sides on one case; returns its JSON record."""
    config_name, overrides = CASES[name]
    config = jconfig.load(config_name, [*overrides, f"train.epochs={epochs}"])
    if (config.optim.b1, config.optim.b2, config.optim.eps) != (0.9, 0.999, 1e-8):
        raise SystemExit(f"{config_name}: Adam constants differ from PyTorch's defaults used by the port")
    setup = jsgd.make_setup(config, dataset)
    df, users, movies, mask = data
    low, high = float(df["rating"].min()), float(df["rating"].max())
    model = build_model(
        config.model.kind, len(users), len(movies), config.model.n_factors,
        min_rating=low, max_rating=high, generator=torch.Generator().manual_seed(seed),
    )
    init = W.to_jaxcf_arrays(model)
    orders = nb.seeded_orders(int((~mask).sum()), seed)
    train_dl, valid_dl = nb.make_dataloaders(df, mask, config.train.batch_size, orders=orders, num_workers=0)
    opt = build_optimizer(config.optim.name, model.parameters(), config.optim.learning_rate, config.optim.weight_decay)

    torch_epochs = []
    start = time.perf_counter()
    nb.fit(
        model, train_dl, epochs, opt, nn.MSELoss(), valid_dl, verbose=False,
        on_epoch=lambda epoch, m, row: torch_epochs.append((nb.predict(m, valid_dl), row)),
    )
    torch_seconds = time.perf_counter() - start

    jax_epochs = []
    ratings, valid = dataset.ratings, dataset.split.valid

    def on_epoch(state, progress, record):
        predictions = jevaluate.predict_pairs(
            state.params, ratings.users[valid], ratings.items[valid], setup.y_range, chunk=config.train.eval_batch_size
        )
        jax_epochs.append((predictions, record))

    start = time.perf_counter()
    family = jsgd.family(setup, orders=orders)
    jtrainer.train(family, config, jsgd.init_state(setup, params=init), on_epoch=on_epoch)
    jax_seconds = time.perf_counter() - start

    targets = ratings.ratings[valid].astype(np.float64)
    rows = []
    for (torch_pred, torch_row), (jax_pred, record) in zip(torch_epochs, jax_epochs):
        torch_rmse = math.sqrt(float(np.mean((torch_pred.astype(np.float64) - targets) ** 2)))
        rows.append({
            "epoch": record["epoch"],
            "train_loss_torch": torch_row["train_loss"],
            "train_loss_jaxcf": record["train_loss"],
            "valid_rmse_torch": torch_rmse,
            "valid_rmse_jaxcf": record["valid_rmse_rows"],
            "valid_rmse_notebook_torch": math.sqrt(torch_row["val_loss"]),
            "valid_rmse_notebook_jaxcf": math.sqrt(record["valid_loss_notebook"]),
            "max_abs_prediction_diff": float(np.max(np.abs(torch_pred.astype(np.float64) - jax_pred))),
        })
    return {
        "case": name,
        "config": config_name,
        "overrides": overrides,
        "optimizer": dataclasses.asdict(config.optim),
        "epochs": rows,
        "torch_seconds": torch_seconds,
        "jaxcf_seconds": jax_seconds,
    }


def format_case(record: dict) -> str:
    o = record["optimizer"]
    lines = [
        f"{record['case']}: {record['config']} {' '.join(record['overrides'])}".rstrip()
        + f" ({o['name']}, lr {o['learning_rate']:g}, weight decay {o['weight_decay']:g}); "
        f"torch {record['torch_seconds']:.1f} s, jaxcf {record['jaxcf_seconds']:.1f} s",
        "epoch  train_loss torch  jaxcf     val_rmse torch  jaxcf     |diff|    max|pred diff|",
    ]
    for r in record["epochs"]:
        lines.append(
            f"{r['epoch']:>5d}  {r['train_loss_torch']:>16.6f}  {r['train_loss_jaxcf']:.6f}  "
            f"{r['valid_rmse_torch']:>14.6f}  {r['valid_rmse_jaxcf']:.6f}  "
            f"{abs(r['valid_rmse_torch'] - r['valid_rmse_jaxcf']):.1e}   {r['max_abs_prediction_diff']:.1e}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/parity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42, help="torch's initial weights and batch order")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    if args.epochs < 1:
        print("error: --epochs must be >= 1", file=sys.stderr)
        return 2
    # A batch of 64 is too small for PyTorch's intra-op threads to help; on a shared 2-core machine
    # they make an epoch several times slower. Results do not depend on it.
    torch.set_num_threads(1)

    dataset = jdata.load(jconfig.DataConfig(), seed=42)
    df, users, movies = nb.map_ids(nb.load_ratings())
    mask = nb.split_mask(len(df), seed=42)
    if not (np.array_equal(df["userId"].to_numpy(), dataset.ratings.users)
            and np.array_equal(np.flatnonzero(mask), dataset.split.valid)):
        print("error: the port's id maps or split differ from jaxcf's; run tests/test_parity.py", file=sys.stderr)
        return 1

    results = []
    for name in args.cases:
        record = run_case(name, dataset, (df, users, movies, mask), args.epochs, args.seed)
        results.append(record)
        print(format_case(record), end="\n\n", flush=True)

    report = {
        "machine": f"{os.cpu_count()}-core {platform.machine()} {platform.system()}",
        "jax_backend": jax.default_backend(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__},
        "seed": args.seed,
        "cases": results,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.json.parent, prefix=f".{args.json.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(report, handle, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
