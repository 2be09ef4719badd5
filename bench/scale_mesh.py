"""Mesh benchmark: training throughput on 1, 2, 4 and 8 host (CPU) devices.

    python bench/scale_mesh.py [--devices 1,2,4,8] [--optimizers adamw,lazy_adam] [--batch-size 64]
                               [--ratings 16384] [--epochs 3] [--json PATH]

For each device count ``k`` a child process starts with ``XLA_FLAGS=--xla_force_host_platform_device_count=k``
(JAX fixes its devices at start-up) and, for each optimizer, trains the biased model (50 factors)
on the bundled ml-latest-small ratings under every mesh of ``k`` devices that this script measures:

``1x1``  one device, the unsharded program (``jaxcf.core.steps.make_train_epoch``), the baseline;
``kx1``  pure data parallel: every device holds the whole tables and ``1/k`` of each batch;
``1xk``  pure model parallel: every device holds ``1/k`` of every table and the whole batch.

One epoch is the first ``--ratings`` positions of the seeded shuffle (256 batches of 64 by
default), as ``jaxcf.training.loop.fit`` would run them: for a mesh that includes building the batches on
the host (``distributed.ShardedEpoch.batches``), timed separately as ``host_batches_s``. Compilation
is timed apart (ahead-of-time ``lower().compile()``). ``ratings_per_s`` is ratings over the median
epoch time of the epochs after the first. ``state_bytes_per_device`` is the largest amount of
training state (parameters and optimizer slots) on one device, and ``temp_bytes`` the compiled
program's temporaries on a device (``memory_analysis()``).

Read the numbers for what they are on a CPU: the ``k`` host devices share this machine's physical
cores (``machine.cpu_count`` in the JSON; 2 on the machine where docs/distributed.md was written),
so more devices cannot make training faster here. The figures measure what the mesh *costs*: the
collectives XLA inserts (an all-reduce of gathered rows over ``model``, of table gradients over
``data``) and their synchronisation, per batch. On a multi-GPU host the same program splits the
work over real devices.

What does not live here: the mesh code (``jaxcf.core.distributed``), correctness checks
(``tests/test_distributed.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (bench/ is not a package; the scripts run as files)


def _sync(x):
    import jax

    return jax.block_until_ready(x)


def meshes(devices: int) -> list[tuple[int, int]]:
    """(data, model) shapes measured for a device count."""
    return [(1, 1)] if devices == 1 else [(devices, 1), (1, devices)]


def measure(args: argparse.Namespace, dataset, optimizer: str, data: int, model: int) -> dict:
    """One (optimizer, mesh) in this process: compile, then ``--epochs`` timed epochs."""
    import jax
    import jax.numpy as jnp

    from jaxcf import config as cfg
    from jaxcf.core import distributed, rng, steps
    from jaxcf.families.sgd import fit as sgd

    config = cfg.load("bias.yaml", [
        f"optim.name={optimizer}", f"train.batch_size={args.batch_size}", f"mesh.data={data}", f"mesh.model={model}",
    ])
    setup = sgd.make_setup(config, dataset)
    ratings, rows = dataset.ratings, setup.train_rows
    shuffle_key = rng.stream(config.seed, "order")
    orders = [
        steps.shuffle_order(shuffle_key, e, len(rows), args.batch_size)[: args.ratings] for e in range(args.epochs)
    ]
    num_ratings = len(orders[0])
    layout = distributed.make_layout(config)
    record = {"optimizer": optimizer, "mesh": f"{data}x{model}", "data": data, "model": model,
              "batch_size": args.batch_size, "ratings_per_epoch": num_ratings}

    if layout is None:
        state = sgd.init_state(setup)
        host = (jnp.asarray(ratings.users[rows]), jnp.asarray(ratings.items[rows]), jnp.asarray(ratings.ratings[rows]))
        epoch_fn = steps.make_train_epoch(setup.optimizer, setup.y_range, args.batch_size)
        start = time.perf_counter()
        compiled = epoch_fn.lower(state, jnp.float32(0), *host, jnp.asarray(orders[0])).compile()
        record["compile_s"] = time.perf_counter() - start

        def run(state, order):
            start = time.perf_counter()
            state, losses = compiled(state, jnp.float32(0), *host, jnp.asarray(order))
            np.asarray(losses)
            return state, time.perf_counter() - start, 0.0

    else:
        state = layout.init(lambda: sgd.init_state(setup))
        host = (ratings.users[rows], ratings.items[rows], ratings.ratings[rows])
        epoch = distributed.ShardedEpoch(layout, steps.make_epoch_body(setup.optimizer, setup.y_range),
                                         args.batch_size)
        batches = epoch.batches(*host, orders[0])
        start = time.perf_counter()
        compiled = epoch.jitted(state).lower(state, jnp.float32(0), batches).compile()
        record["compile_s"] = time.perf_counter() - start
        record["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes

        def run(state, order):
            start = time.perf_counter()
            batches = _sync(epoch.batches(*host, order))
            built = time.perf_counter()
            state, losses = compiled(state, jnp.float32(0), batches)
            np.asarray(losses)
            return state, time.perf_counter() - start, built - start

    record["state_bytes_per_device"] = max(
        sum(leaf.addressable_shards[k].data.nbytes for leaf in jax.tree.leaves(state))
        for k in range(len(jax.tree.leaves(state)[0].addressable_shards))
    )
    epochs = []
    for order in orders:
        state, seconds, host_s = run(state, order)
        epochs.append({"epoch_s": seconds, "host_batches_s": host_s})
    timed = epochs[1:] if len(epochs) > 1 else epochs
    epoch_s = float(np.median([e["epoch_s"] for e in timed]))
    record.update(
        epochs=epochs,
        epoch_s=epoch_s,
        host_batches_s=float(np.median([e["host_batches_s"] for e in timed])),
        ratings_per_s=num_ratings / epoch_s,
        us_per_batch=epoch_s / -(-num_ratings // args.batch_size) * 1e6,
    )
    print(f"  {record['mesh']:>5} {optimizer:>9}: {epoch_s:6.2f} s/epoch  {record['ratings_per_s']:9.0f} ratings/s  "
          f"compile {record['compile_s']:.1f} s", file=sys.stderr, flush=True)
    return record


def run_devices(args: argparse.Namespace, devices: int) -> list[dict]:
    """Everything for one device count, in this process (started with that many devices)."""
    import jax

    from jaxcf import config as cfg
    from jaxcf.data import load as load_dataset

    if jax.device_count() != devices:
        raise SystemExit(f"expected {devices} devices, found {jax.device_count()}")
    dataset = load_dataset(cfg.DataConfig(), seed=42)
    results = []
    for optimizer in args.optimizers:
        for data, model in meshes(devices):
            load_before = machine.load_average()
            record = measure(args, dataset, optimizer, data, model)
            results.append({**record, "devices": devices, "load_average_before": load_before,
                            "device": machine.jax_device()})
    return results


def parse_args(argv=None) -> argparse.Namespace:
    def int_list(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 1,2,4,8") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
        return values

    def optimizers(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        allowed = ("adam", "adamw", "lazy_adam")
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown optimizer(s) {bad}; allowed: {', '.join(allowed)}")
        return names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int_list, default=[1, 2, 4, 8], help="host device counts, e.g. 1,2,4,8")
    parser.add_argument("--optimizers", type=optimizers, default=["adamw", "lazy_adam"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ratings", type=int, default=16_384, help="training ratings per timed epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first is a warm-up; the median of the rest counts")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one device count here
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.ratings < 1 or args.epochs < 1:
        parser.error("--batch-size, --ratings and --epochs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        args.json.write_text(json.dumps(run_devices(args, args.one)))
        return 0
    results = []
    for devices in args.devices:
        print(f"{devices} device(s):", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "one.json"
            child = [sys.executable, __file__, "--one", str(devices), "--json", str(out),
                     "--optimizers", ",".join(args.optimizers), "--batch-size", str(args.batch_size),
                     "--ratings", str(args.ratings), "--epochs", str(args.epochs)]
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
            done = subprocess.run(child, env=env)
            if done.returncode != 0:
                print(f"error: the run with {devices} device(s) failed (exit {done.returncode})", file=sys.stderr)
                return 1
            results.extend(json.loads(out.read_text()))
    print(f"{'devices':>7} {'mesh':>5} {'optimizer':>9} {'epoch s':>8} {'ratings/s':>10} {'us/batch':>9} "
          f"{'host s':>7} {'compile s':>9} {'state MB/dev':>12}")
    for r in results:
        print(f"{r['devices']:>7} {r['mesh']:>5} {r['optimizer']:>9} {r['epoch_s']:>8.3f} {r['ratings_per_s']:>10.0f} "
              f"{r['us_per_batch']:>9.0f} {r['host_batches_s']:>7.3f} {r['compile_s']:>9.1f} "
              f"{r['state_bytes_per_device'] / 1e6:>12.2f}")
    if args.json:
        summary = {
            "benchmark": "scale_mesh",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "note": ("host devices share the machine's physical cores (cpu_count), so these figures measure the "
                     "mesh's overhead (collectives and synchronisation per batch), not a speed-up"),
            "machine": machine.describe("jax", "jaxlib", "numpy"),
            "runs": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
