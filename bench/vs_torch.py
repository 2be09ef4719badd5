"""jaxcf against the PyTorch port of the notebook, on the notebook's workload, in one run on one machine.

    python bench/vs_torch.py [--repeats 3] [--skip-cli] [--json PATH]

The workload: bundled ml-latest-small (Oct 2016), the biased model (50 factors), batch size 64,
80,004 training ratings (1,251 steps per epoch, the last of 4 ratings), the notebook's optimizer
(``torch.optim.Adam``, lr 1e-3, coupled L2 1e-4; ``optim.name=adam`` in jaxcf).

What is timed, each at least ``--repeats`` times (medians reported):

- ``torch_epoch_s``: one epoch of ``reference_torch.fit`` (the notebook's loop: DataLoader with one
  worker, forward, backward, ``optim.step()`` per batch, then its validation), on CUDA when
  PyTorch sees a GPU, else on the CPU.
- ``torch_workers0_epoch_s``: the same with the batches loaded in the main process
  (``num_workers=0``); ``torch_1thread_epoch_s`` and ``torch_workers0_1thread_epoch_s``: both again
  with PyTorch on one intra-op thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``) instead
  of its default (one per core). ``speedup`` is against the fastest of the four settings;
  ``speedups`` lists each.
- ``jax_epoch_s``: one epoch of ``jaxcf.training.loop.fit`` (one compiled ``lax.scan`` over the epoch, one host
  sync, then the validation and the metrics), epochs after the first; on JAX's default backend.
- ``*_train_s``: the same without the validation (jaxcf's own ``train_seconds``; for torch, the epoch
  minus a separately timed ``validate`` call).
- ``compile_s``: compiling jaxcf's epoch function, ahead of time (``lower().compile()``), apart
  from the epochs.
- ``*_cli_s``: wall time of the whole command, start to exit, as a user runs it (5 epochs each):
  ``python -m jaxcf.train --config configs/bias.yaml --set optim.name=adam --quiet --workdir <tmp>``
  and ``python -m reference_torch.train --model bias --epochs 5``.
- ``peak_rss_bytes``: peak resident set of the jaxcf CLI process (max over repeats); the torch CLI's
  is ``torch_cli_peak_rss_bytes``.

Other processes on the machine skew every figure: the load average is recorded before and after.
What does not live here: the training code of either side.
"""

from __future__ import annotations

import argparse
import json
import os
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

JAX_CLI = ["-m", "jaxcf.train", "--config", "configs/bias.yaml", "--set", "optim.name=adam", "--quiet"]
TORCH_CLI = ["-m", "reference_torch.train", "--model", "bias", "--epochs", "5"]


def time_jaxcf(repeats: int) -> dict:
    import jax

    from jaxcf import config as jconfig
    from jaxcf import data
    from jaxcf.core import steps
    from jaxcf.families.sgd import fit as sgd
    from jaxcf.training import api

    config = jconfig.load("bias.yaml", ["optim.name=adam", f"train.epochs={repeats + 1}"])
    dataset = data.load(config.data, config.seed)
    setup = sgd.make_setup(config, dataset)

    # Compilation alone, ahead of time, on a separate jit of the same epoch function.
    ratings = dataset.ratings
    rows = setup.train_rows
    args = (
        sgd.init_state(setup),
        jax.numpy.float32(0),
        jax.numpy.asarray(ratings.users[rows]),
        jax.numpy.asarray(ratings.items[rows]),
        jax.numpy.asarray(ratings.ratings[rows]),
        steps.shuffle_order(jax.random.key(0), 0, len(rows), config.train.batch_size),
    )
    start = time.perf_counter()
    steps.make_train_epoch(setup.optimizer, setup.y_range, config.train.batch_size).lower(*args).compile()
    compile_s = time.perf_counter() - start

    with open(os.devnull, "w") as silent:
        records = api.run(config, dataset, quiet=True, out=silent).history
    later = records[1:]  # the first epoch also compiles
    return {
        "jax_epoch_s": statistics.median(r["seconds"] for r in later),
        "jax_train_s": statistics.median(r["train_seconds"] for r in later),
        "jax_first_epoch_s": records[0]["seconds"],
        "jax_epochs_s": [r["seconds"] for r in records],
        "jax_valid_rmse_per_epoch": [r["valid_rmse"] for r in records],
        "compile_s": compile_s,
        "jax_device": machine.jax_device(),
    }


def time_torch(repeats: int, num_workers: int = 1, threads: int | None = None) -> dict:
    import torch
    import torch.nn as nn

    if threads is not None:
        torch.set_num_threads(threads)
    from reference_torch import notebook as nb
    from reference_torch.train import build_model, build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    df, _, _ = nb.map_ids(nb.load_ratings())
    mask = nb.split_mask(len(df), 42)
    generator = torch.Generator().manual_seed(42)
    train_dl, valid_dl = nb.make_dataloaders(
        df, mask, 64, generator=torch.Generator().manual_seed(43), num_workers=num_workers
    )
    model = build_model(
        "bias", int(df["userId"].max()) + 1, int(df["movieId"].max()) + 1, 50,
        min_rating=float(df["rating"].min()), max_rating=float(df["rating"].max()), generator=generator,
    ).to(device)
    opt = build_optimizer("adam", model.parameters(), 1e-3, 1e-4)
    criterion = nn.MSELoss()

    stamps = [time.perf_counter()]

    def on_epoch(epoch, model, row):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    history = nb.fit(model, train_dl, repeats, opt, criterion, valid_dl, on_epoch=on_epoch, verbose=False)
    epochs = [b - a for a, b in zip(stamps, stamps[1:])]
    valid_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        nb.validate(model, valid_dl, criterion)
        valid_times.append(time.perf_counter() - start)
    epoch_s = statistics.median(epochs)
    return {
        "torch_epoch_s": epoch_s,
        "torch_train_s": epoch_s - statistics.median(valid_times),
        "torch_epochs_s": epochs,
        "torch_valid_s": statistics.median(valid_times),
        "torch_val_loss_per_epoch": [row["val_loss"] for row in history],
        "torch_device": str(device) + (f": {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
    }


def time_cli(argv: list[str], repeats: int, workdir_flag: bool) -> tuple[list[float], int]:
    """Wall seconds of each run and the peak RSS (bytes) over the runs, from ``wait4``'s rusage."""
    times, peak = [], 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, *argv] + (["--workdir", str(Path(tmp) / "run")] if workdir_flag else [])
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            times.append(time.perf_counter() - start)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                tail = proc.stderr.read().decode()[-500:]
                raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {tail}")
            proc.stderr.close()
            peak = max(peak, usage.ru_maxrss * 1024)
    return times, peak


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="epochs / CLI runs per side (medians reported)")
    parser.add_argument("--skip-cli", action="store_true", help="only the in-process epoch timings")
    parser.add_argument("--json", type=Path, help="write the results here")
    # internal: one side, timed in a child process
    parser.add_argument("--side", choices=("jax", *TORCH_SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


# PyTorch settings timed: (DataLoader workers, intra-op threads; None = PyTorch's default, one per core).
TORCH_SETTINGS = {
    "torch": (1, None),
    "torch-workers0": (0, None),
    "torch-1thread": (1, 1),
    "torch-workers0-1thread": (0, 1),
}


def run_side(side: str, repeats: int) -> dict:
    """Times one side in a fresh process: PyTorch's DataLoader forks a worker, which must not
    happen in a process that has JAX's threads running; and neither side warms the other's caches."""
    env = dict(os.environ)
    if TORCH_SETTINGS.get(side, (None, None))[1] == 1:
        env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        cmd = [sys.executable, __file__, "--side", side, "--repeats", str(repeats), "--json", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"timing the {side} side failed (exit {done.returncode})")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side is not None:
        if args.side == "jax":
            timed = time_jaxcf(args.repeats)
        else:  # keys prefixed with the setting: torch_, torch_workers0_, torch_1thread_, ...
            workers, threads = TORCH_SETTINGS[args.side]
            prefix = args.side.replace("-", "_") + "_"
            timed = {k.replace("torch_", prefix, 1): v for k, v in time_torch(args.repeats, workers, threads).items()}
        args.json.write_text(json.dumps(timed))
        return 0
    result = {"benchmark": "vs_torch", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "repeats": args.repeats, "load_average_before": machine.load_average()}
    print("timing jaxcf epochs ...", file=sys.stderr, flush=True)
    result.update(run_side("jax", args.repeats))
    for side, (workers, threads) in TORCH_SETTINGS.items():
        print(f"timing reference_torch epochs: {workers} DataLoader worker(s), "
              f"{threads or 'default'} thread(s) ...", file=sys.stderr, flush=True)
        result.update(run_side(side, args.repeats))
    epochs = {side: result[side.replace("-", "_") + "_epoch_s"] for side in TORCH_SETTINGS}
    fastest = min(epochs, key=epochs.get)
    result["torch_fastest_setting"] = fastest
    result["torch_fastest_epoch_s"] = epochs[fastest]
    result["speedups"] = {side: value / result["jax_epoch_s"] for side, value in epochs.items()}
    result["speedup"] = epochs[fastest] / result["jax_epoch_s"]  # against PyTorch at its best setting here
    result["speedup_vs_workers0"] = result["torch_workers0_epoch_s"] / result["jax_epoch_s"]
    fastest_train = result[fastest.replace("-", "_") + "_train_s"]
    result["speedup_train_only"] = fastest_train / result["jax_train_s"]
    if not args.skip_cli:
        print("timing the two CLIs ...", file=sys.stderr, flush=True)
        jax_times, jax_peak = time_cli(JAX_CLI, args.repeats, workdir_flag=True)
        torch_times, torch_peak = time_cli(TORCH_CLI, args.repeats, workdir_flag=False)
        result.update(
            jax_cli_s=statistics.median(jax_times), jax_cli_runs_s=jax_times,
            torch_cli_s=statistics.median(torch_times), torch_cli_runs_s=torch_times,
            cli_speedup=statistics.median(torch_times) / statistics.median(jax_times),
            peak_rss_bytes=jax_peak, torch_cli_peak_rss_bytes=torch_peak,
        )
    result["load_average_after"] = machine.load_average()
    result["machine"] = machine.describe("jax", "jaxlib", "flax", "optax", "torch", "numpy")

    for side in TORCH_SETTINGS:
        print(f"  {side:<24} {epochs[side]:.3f} s per epoch ({result['speedups'][side]:.1f}x)")
    print(f"torch at its fastest setting here ({fastest}) {result['torch_fastest_epoch_s']:.3f} s per epoch "
          f"({result['torch_device']}), jaxcf {result['jax_epoch_s']:.3f} s ({result['jax_device']}): "
          f"{result['speedup']:.1f}x (training only {result['speedup_train_only']:.1f}x); "
          f"jaxcf compile {result['compile_s']:.2f} s")
    if "jax_cli_s" in result:
        print(f"CLI, 5 epochs: torch {result['torch_cli_s']:.1f} s, jaxcf {result['jax_cli_s']:.1f} s "
              f"({result['cli_speedup']:.1f}x); jaxcf peak RSS {result['peak_rss_bytes'] / 1e6:.0f} MB")
    print(f"load average before {result['load_average_before']}, after {result['load_average_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
