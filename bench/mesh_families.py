"""The other model families on a mesh: max |sharded - single| and what the mesh runs, per family.

    python bench/mesh_families.py [--mesh 2x4] [--json results/mesh_families.json]

Part 1 trains each case of ``tests/distributed_worker.py``'s ``FAMILY_CASES`` (a 4-member ensemble,
the Gibbs sampler, iALS) through the CLI twice, as ``tests/test_distributed.py`` does: once under the
mesh in a process with 8 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), once in
a process with one device. The data is the test's ``small_csv``: the first 4,000 bundled ratings (22
users, 2,273 movies; under ``model: 4`` both tables are padded). It records, per case, the max
|sharded - single| of every exported table and of every numeric metric (over all epochs and the
closing record).

Part 2 (``--programs``, a child with 8 devices) compiles the Gibbs and iALS sweeps on the bundled
ml-latest-small under 1x8, 2x4 and 8x1 and records each program's collectives (read from the
compiled HLO), its per-device FLOPs (``cost_analysis``) and per-device memory (``memory_analysis``):
what a sweep gathers, and which mesh axis splits the work.

What does not live here: the assertions (``tests/test_distributed.py``), the SGD cases
(``tests/distributed_worker.py``), throughput (``bench/scale_mesh.py``).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (bench/ is not a package; the scripts run as files)

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"epoch", "seconds", "train_seconds", "final", "members", "scored_users", "candidates"}


def _worker_cases() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import distributed_worker

    return distributed_worker.FAMILY_CASES


def _env(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env.pop("JAX_PLATFORMS", None)
    return env


def small_csv(path: Path) -> Path:
    """The first 4,000 bundled ratings, as ``tests/test_distributed.py``'s ``small_csv`` fixture writes them."""
    from jaxcf import config as cfg
    from jaxcf.data import load as load_dataset

    ratings = load_dataset(cfg.DataConfig(), seed=42).ratings
    rows = slice(0, 4000)
    lines = ["userId,movieId,rating"] + [
        f"{u},{i},{r}" for u, i, r in zip(ratings.user_ids.raw[ratings.users[rows]],
                                          ratings.item_ids.raw[ratings.items[rows]], ratings.ratings[rows])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def train(workdir: Path, overrides: list[str], devices: int) -> float:
    command = [sys.executable, "-m", "jaxcf.train", "--config", "bias.yaml", "--workdir", str(workdir), "--quiet",
               "--set", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def compare(sharded: Path, single: Path) -> dict:
    import safetensors.numpy

    records = [[json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
               for folder in (sharded, single)]
    assert [r["epoch"] for r in records[0]] == [r["epoch"] for r in records[1]]
    metrics: dict[str, float] = {}
    for got, want in zip(*records):
        for key, value in want.items():
            if key in SKIP or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metrics[key] = max(metrics.get(key, 0.0), abs(float(got[key]) - float(value)))
    tables = [safetensors.numpy.load_file(str(folder / "model" / "weights.safetensors"))
              for folder in (sharded, single)]
    params = {name: float(np.max(np.abs(tables[0][name] - tables[1][name]))) for name in sorted(tables[1])}
    return {"params": params, "max_param": max(params.values()), "metrics": metrics,
            "epochs": records[1][-1]["epoch"],
            "last": {k: v for k, v in records[1][-1].items() if k in ("valid_rmse", "ndcg@20", "recall@20")}}


# ------------------------------------------------------------------------------ part 2: the programs


def _program(kind: str, mesh: str) -> dict:
    import jax

    from jaxcf import config as cfg
    from jaxcf.core import distributed
    from jaxcf.data import load as load_dataset
    from jaxcf.data.implicit import from_config as implicit_data
    from jaxcf.families.bpmf import fit as gibbs
    from jaxcf.families.ials import fit as ials

    data, model = map(int, mesh.split("x"))
    cases = _worker_cases()
    overrides = [o for o in cases[kind] if not o.startswith("data.path")]
    config = cfg.load("bias.yaml", [*overrides, f"mesh.data={data}", f"mesh.model={model}"])
    dataset = load_dataset(config.data, config.seed)
    if kind == "ials":
        dataset = implicit_data(dataset, config.data, config.seed)
    layout = distributed.make_layout(config)
    family = (ials.family if kind == "ials" else gibbs.family)(config, dataset, layout)
    state = layout.init(family.init, family.row_axes)
    closure = inspect.getclosurevars(family.epoch).nonlocals  # the family's own jitted sweep
    sweep = closure["sweep_fn"]
    if kind == "ials":
        lowered = sweep.lower(state, *closure["data"])
    else:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(closure["chain_keys"], 1)
        lowered = sweep.lower(keys, state.users, state.items, closure["user_side_d"], closure["item_side_d"])
    compiled = lowered.compile()
    collectives = collections.Counter()
    for line in compiled.as_text().splitlines():
        match = re.search(r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", line)
        if match:
            shape = line.split("=", 1)[1].split(match.group(1))[0].strip()
            collectives[f"{match.group(1)} {shape}"] += 1
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "family": kind, "mesh": mesh, "num_users": dataset.ratings.num_users, "num_items": dataset.ratings.num_items,
        "collectives": dict(collectives), "flops_per_device": float(cost.get("flops", float("nan"))),
        "argument_bytes": memory.argument_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
    }


def programs() -> list[dict]:
    import jax

    assert jax.device_count() == 8, "run with 8 devices"
    return [_program(kind, mesh) for kind in ("gibbs", "ials") for mesh in ("1x8", "2x4", "8x1")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="2x4", help="DATAxMODEL of the sharded runs (8 devices at most)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--programs", type=Path, help=argparse.SUPPRESS)  # the part-2 child writes here
    args = parser.parse_args()
    if args.programs:
        args.programs.write_text(json.dumps(programs()))
        return 0

    data, model = map(int, args.mesh.split("x"))
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = small_csv(tmp / "small.csv")
        for name, overrides in _worker_cases().items():
            common = [f"data.path={csv}", *overrides]
            seconds = {"sharded": train(tmp / f"{name}-mesh", [*common, f"mesh.data={data}", f"mesh.model={model}"], 8),
                       "single": train(tmp / f"{name}-single", common, 1)}
            differences = compare(tmp / f"{name}-mesh", tmp / f"{name}-single")
            cases[name] = {"overrides": overrides, "seconds": seconds, **differences}
            print(f"{name}: max |sharded - single| params {cases[name]['max_param']:.3g}, "
                  + ", ".join(f"{k} {v:.3g}" for k, v in cases[name]["metrics"].items()
                              if k in ("train_loss", "valid_rmse", "ndcg@20", "recall@20")), flush=True)
        child = [sys.executable, __file__, "--programs", str(tmp / "programs.json")]
        proc = subprocess.run(child, cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"the programs child exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        compiled = json.loads((tmp / "programs.json").read_text())
    for row in compiled:
        print(f"{row['family']} {row['mesh']}: {row['flops_per_device'] / 1e6:.0f} MFLOP/device, arguments "
              f"{row['argument_bytes'] / 1e6:.1f} MB, temporaries {row['temp_bytes'] / 1e6:.1f} MB, "
              f"{row['collectives']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "mesh": args.mesh,
                   "cases": cases, "programs": compiled, "machine": {**machine.describe("jax", "jaxlib"),
                                                                      "load_average": machine.load_average()}}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
