"""Row-wise against dense row-sparse steps: when does computing every row beat gathering the touched ones?

    python bench/row_sparse.py [--json results/row_sparse.json]

For each (ratings, batch size) of a small grid, ``bench/scale.py`` runs ``lazy_adam`` twice on its
synthetic MovieLens-20M-shaped data, once with every table updated row-wise
(``--dense-rows-per-id 0``) and once densely (``inf``), each in its own process, alternating. The
result is the same either way (tested in ``tests/test_optim.py``); only the time differs. Reports
wall and CPU seconds per epoch (medians of the epochs after the first) and the rows per batch entry
of the user table, the quantity ``jaxcf.core.sparse.RowSparse.dense_rows_per_id`` thresholds (default 4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import machine  # noqa: E402

GRID = [(1_000_000, 4_096), (1_000_000, 16_384), (1_000_000, 65_536), (2_000_000, 262_144)]


def run(ratings: int, batch: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scale.json"
        cmd = [sys.executable, str(HERE / "scale.py"), "--ratings", str(ratings), "--batch-size", str(batch),
               "--epochs", "3", "--dense-rows-per-id", mode, "--json", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)
        record = json.loads(out.read_text())["runs"][0]
    timed = record["epochs"][1:]
    cpu = sorted(e["epoch_cpu_s"] for e in timed)[len(timed) // 2]
    return {"epoch_s": record["epoch_s"], "epoch_cpu_s": cpu, "valid_rmse": record["epochs"][-1]["valid_rmse"],
            "num_users": record.get("num_users"), "num_train": record.get("num_train")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    load_before = machine.load_average()
    for ratings, batch in GRID:
        row = {"ratings": ratings, "batch_size": batch}
        for mode, label in (("0", "row_wise"), ("inf", "dense")):
            row[label] = run(ratings, batch, mode)
        users = row["dense"]["num_users"]
        row["user_rows_per_batch_entry"] = users / batch if users else None
        rows.append(row)
        print(f"{ratings:>10,} ratings, batch {batch:>7,}: row-wise {row['row_wise']['epoch_s']:.2f} s "
              f"(CPU {row['row_wise']['epoch_cpu_s']:.2f}), dense {row['dense']['epoch_s']:.2f} s "
              f"(CPU {row['dense']['epoch_cpu_s']:.2f})", flush=True)
    if args.json:
        machine.write_json(args.json, {"command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows},
                           load_before, "jax", "jaxlib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
