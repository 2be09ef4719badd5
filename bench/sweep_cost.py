"""The cost of K models trained in one vmapped program against K separate runs.

    python bench/sweep_cost.py [--config configs/bias.yaml] [--models 8] [--epochs 5]
                               [--set KEY=VALUE ...] [--json PATH]

Two measurements, both on the same config, the same K seeds and the same number of epochs:

- **Whole commands** (what a user waits for): K separate processes of
  ``python -m jaxcf.train --config C --set seed=s ...`` one after the other, against one process of
  ``python -m jaxcf.sweep --config C --seeds K ...``. Wall time and CPU time (user + system of the
  child processes) of each; process start, imports, data loading and compilation are included, as
  they are for a user.
- **Training alone** (steady state, compiled, in this process): the median time of one epoch of
  ``jaxcf.core.steps.make_train_epoch`` (one model) against one epoch of
  ``jaxcf.core.steps.make_members_epoch`` with K members, and the compile time of each
  (``lower().compile()``).

Other processes on the machine skew wall times: the load average is recorded before and after, and
CPU times are given beside wall times. What does not live here: the trainers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
import machine  # noqa: E402  (bench/ is not a package; the scripts run as files)


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one command run to completion."""
    cpu = _child_cpu()
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, _child_cpu() - cpu


def time_commands(config: str, models: int, epochs: int, overrides: list[str]) -> dict:
    sets = [f"train.epochs={epochs}", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        separate = []
        for k in range(models):
            argv = ["-m", "jaxcf.train", "--config", config, "--quiet", "--workdir", f"{tmp}/run{k}",
                    "--set", *sets, f"seed={42 + k}"]
            separate.append(_run(argv))
        sweep = _run(["-m", "jaxcf.sweep", "--config", config, "--seeds", str(models), "--quiet",
                      "--out", f"{tmp}/sweep.json", "--set", *sets, "seed=42"])
        results = json.loads(Path(f"{tmp}/sweep.json").read_text())
    return {
        "separate_runs_wall_s": sum(w for w, _ in separate),
        "separate_runs_cpu_s": sum(c for _, c in separate),
        "separate_run_wall_s_each": [w for w, _ in separate],
        "sweep_wall_s": sweep[0],
        "sweep_cpu_s": sweep[1],
        "sweep_member_valid_rmse": [m["valid_rmse"] for m in results["members"]],
    }


def time_epochs(config_name: str, models: int, overrides: list[str], repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxcf import config as jconfig
    from jaxcf import data
    from jaxcf.core import steps
    from jaxcf.families.sgd import fit as sgd
    from jaxcf.families.sgd import members

    config = jconfig.load(config_name, overrides)
    dataset = data.load(config.data, config.seed)
    setup = sgd.make_setup(config, dataset)
    ratings, rows = dataset.ratings, setup.train_rows
    users, items, targets = (jnp.asarray(x[rows]) for x in (ratings.users, ratings.items, ratings.ratings))
    n = len(rows)
    order = steps.shuffle_order(jax.random.key(0), 0, n, config.train.batch_size)

    def timed(fn, state, *args) -> tuple[float, list[float], list[float]]:
        start = time.perf_counter()
        compiled = fn.lower(state, *args).compile()
        compile_s = time.perf_counter() - start
        times, cpu_times = [], []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            state, losses = compiled(state, *args)
            jax.block_until_ready(losses)
            times.append(time.perf_counter() - start)
            # CPU time of all this process's threads: on a loaded machine, wall time also counts the
            # time XLA's threads wait for each other while descheduled.
            cpu_times.append(time.process_time() - cpu)
        return compile_s, times, cpu_times

    single_fn = steps.make_train_epoch(setup.optimizer, setup.y_range, config.train.batch_size)
    single_compile, single, single_cpu = timed(single_fn, sgd.init_state(setup), jnp.float32(0), users, items,
                                               targets, order)

    seeds = [members.Member(jconfig.load(config_name, [*overrides, f"seed={42 + k}"]), {}) for k in range(models)]
    tx = members.make_optimizer(config, steps.num_batches(n, config.train.batch_size))
    state = members.init_members(setup, seeds, tx)
    members_fn = steps.make_members_epoch(tx, setup.y_range, config.train.batch_size)
    orders = jnp.stack([order] * models)
    members_compile, many, many_cpu = timed(members_fn, state, jnp.zeros(models), users, items, targets, orders)
    return {
        "one_model_epoch_s": statistics.median(single),
        "one_model_compile_s": single_compile,
        "members_epoch_s": statistics.median(many),
        "members_compile_s": members_compile,
        "members_epoch_s_per_model": statistics.median(many) / models,
        "one_model_epoch_cpu_s": statistics.median(single_cpu),
        "members_epoch_cpu_s": statistics.median(many_cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bias.yaml")
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per trainer (medians reported)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--skip-commands", action="store_true", help="only the in-process epoch timings")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "sweep_cost.json")
    args = parser.parse_args()

    result = {"command": " ".join(["python", *sys.argv]),
              "machine": machine.describe("jax", "jaxlib", "flax", "optax"), "device": machine.jax_device(),
              "config": args.config, "models": args.models, "epochs": args.epochs, "set": args.set,
              "load_average_before": machine.load_average()}
    result.update(time_epochs(args.config, args.models, args.set, args.repeats))
    if not args.skip_commands:
        result.update(time_commands(args.config, args.models, args.epochs, args.set))
    result["load_average_after"] = machine.load_average()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    k = args.models
    print(f"device {result['device']}, load average {result['load_average_before']} -> {result['load_average_after']}")
    print(f"one epoch: 1 model {result['one_model_epoch_s']:.3f}s; {k} models in one program "
          f"{result['members_epoch_s']:.3f}s ({result['members_epoch_s_per_model']:.3f}s per model)")
    print(f"one epoch, CPU time: 1 model {result['one_model_epoch_cpu_s']:.3f}s; {k} models "
          f"{result['members_epoch_cpu_s']:.3f}s")
    print(f"compile: 1 model {result['one_model_compile_s']:.2f}s; {k} models {result['members_compile_s']:.2f}s")
    if not args.skip_commands:
        print(f"{k} separate train commands: wall {result['separate_runs_wall_s']:.1f}s, "
              f"CPU {result['separate_runs_cpu_s']:.1f}s")
        print(f"one sweep command of {k} models: wall {result['sweep_wall_s']:.1f}s, CPU {result['sweep_cpu_s']:.1f}s")
    print(f"results in {args.json}")


if __name__ == "__main__":
    main()
