"""Sharded and multi-process training (``jaxcf.core.distributed``): every mesh gives the single-device result.

The mesh runs need several devices, and JAX fixes its device count when it starts, so they run in
subprocesses: ``tests/distributed_worker.py`` with 8 CPU devices, and two CLI processes joined by
``jax.distributed`` on 127.0.0.1 (CPU collectives through gloo). This process keeps its one device
and computes the single-device references.

Tolerances: a mesh sums the same numbers in another order (a batch's loss over ``data`` shards, a
table's gradient over ``data`` shards, gathered rows over ``model`` shards), so results agree to
float32 rounding, which Adam then carries from step to step: its normalised update turns a
rounding-level change in a tiny gradient into a visible change of a rarely seen row. So the
parameter tolerance grows with the number of steps (measured differences beside each constant).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxcf import config as cfg
from jaxcf.cli import train
from jaxcf.core import distributed, processes
from jaxcf.data import load as load_dataset
from jaxcf.families.sgd import fit as sgd
from jaxcf.training import api, checkpoint
from jaxcf.training import loop as trainer

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).parent / "distributed_worker.py"
# The worker is a script run in its own process; its case table is read from the same file.
_spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
worker_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker_cases)

# Max |sharded - single| of any parameter. Measured: <= 1.5e-8 after 80 steps (the worker's cases),
# 4.2e-7 after 150 (3 epochs of the 4,000-rating file), 7.7e-6 after 1,251 (1 epoch of the whole
# dataset; 4.4e-6 after 5 epochs: results/mesh_families.json, docs/distributed.md).
ATOL_CASES = 1e-6
ATOL_SMALL = 1e-5
ATOL_FULL = 1e-4
# Metrics average over thousands of ratings: measured <= 1.5e-8 (train_loss), <= 6e-10 (valid RMSE).
METRIC_ATOL = 1e-6
# The other families on 2x4 (FAMILY_CASES); measured (bench/mesh_families.py): ensemble 1.5e-6, Gibbs
# 4.3e-6, iALS 1.5e-5 on parameters; <= 3.7e-8 on any metric. The ensemble is 4 SGD models: as
# ATOL_SMALL. The Gibbs sampler sums its hyper-parameter statistics over sharded rows in another
# order; each sweep then draws from a distribution whose parameters moved by float32 rounding, and 6
# sweeps carry it on. iALS sums each side's Gram matrix over sharded rows (a psum across the model
# axis) in another order, and one device sums each row's normal equations over its own items, a
# chunk of rows at a time, where the mesh multiplies count matrices; 3 sweeps of float32 solves carry
# that rounding along. 1e-4 leaves 23x (Gibbs) and 6.7x (iALS).
FAMILY_ATOL = {"ensemble": ATOL_SMALL, "gibbs": 1e-4, "ials": 1e-4}
FAMILY_METRIC_ATOL = {"ensemble": METRIC_ATOL, "gibbs": 1e-6, "ials": 1e-6}
FAMILY_METRICS = {"ials": ("train_loss", "ndcg@20", "recall@20", "map@20", "mrr")}


def _env(devices: int, **extra: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}
    env.pop("JAX_PLATFORMS", None)
    return env


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _weights(workdir: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(workdir / "model" / "weights.safetensors"))


def _assert_metrics_close(got: list[dict], want: list[dict]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        for key in ("train_loss", "valid_mse", "valid_rmse", "valid_mae", "valid_loss_notebook"):
            assert g[key] == pytest.approx(w[key], abs=METRIC_ATOL), f"epoch {w['epoch']} {key}: {g[key]} vs {w[key]}"


def _assert_params_close(got: dict, want: dict, atol: float) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, f"{name}: shape {got[name].shape} vs {want[name].shape}"
        diff = float(np.max(np.abs(got[name] - want[name])))
        assert diff <= atol, f"{name}: max |sharded - single| = {diff:.3g} > {atol}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli(workdir: Path, *overrides: str, resume: bool = False) -> int:
    argv = ["--config", "bias.yaml", "--workdir", str(workdir), "--quiet", "--set", *overrides]
    return train.main(argv + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory) -> Path:
    """The first 4,000 bundled ratings (22 users, 2,273 movies; neither divides 4 or 8, so meshes pad)."""
    ratings = load_dataset(cfg.DataConfig(), seed=42).ratings
    rows = slice(0, 4000)
    path = tmp_path_factory.mktemp("data") / "small.csv"
    lines = ["userId,movieId,rating"] + [
        f"{u},{i},{r}"
        for u, i, r in zip(
            ratings.user_ids.raw[ratings.users[rows]], ratings.item_ids.raw[ratings.items[rows]], ratings.ratings[rows]
        )
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def worker(tmp_path_factory, small_csv) -> Path:
    """Runs tests/distributed_worker.py once with 8 CPU devices; returns its output folder."""
    out = tmp_path_factory.mktemp("mesh")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(small_csv)],
        cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=1200,
    )
    if proc.returncode != 0:
        pytest.fail(f"distributed_worker.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def cases(worker) -> dict:
    return json.loads((worker / "cases.json").read_text())


# ------------------------------------------------------------------------- one process, one device


def test_one_device_never_takes_the_mesh_path(monkeypatch, bundled):
    def refuse(*args, **kwargs):
        raise AssertionError("the single-device run reached jaxcf.core.distributed.Layout")

    for name in ("init", "place", "replicate", "make_predict", "fetch", "sync"):
        monkeypatch.setattr(distributed.Layout, name, refuse)
    monkeypatch.setattr(distributed, "ShardedEpoch", refuse)
    config = cfg.load("bias.yaml", ["train.epochs=1", "model.n_factors=4"])
    assert distributed.make_layout(config) is None
    trained = api.run(config, bundled, orders=lambda epoch: np.arange(256, dtype=np.int32))
    assert [r["epoch"] for r in trained.history] == [1]
    assert trained.params["user_embedding"].shape == (bundled.ratings.num_users, 4)
    setup = sgd.make_setup(config, bundled)
    family = sgd.family(setup, None, orders=lambda epoch: np.arange(256, dtype=np.int32))
    state, progress = trainer.train(family, config, family.init())
    assert progress.epoch == 1 and state.params["user_embedding"].shape == (bundled.ratings.num_users, 4)


def test_a_mesh_larger_than_the_devices_is_a_one_line_error(tmp_path, capsys):
    assert jax.device_count() == 1
    assert _cli(tmp_path / "run", "mesh.data=2", "mesh.model=4") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: mesh.data * mesh.model = 8, but only 1 device(s) are visible") and "\n" not in err
    assert "xla_force_host_platform_device_count" in err


def test_distributed_settings_come_from_the_config_or_the_environment(monkeypatch):
    for variable in processes.ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    assert processes.num_processes(cfg.DistributedConfig()) == 1
    assert processes.initialize(cfg.DistributedConfig()) is False  # one process: JAX untouched
    monkeypatch.setenv("JAXCF_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXCF_PROCESS_ID", "3")
    monkeypatch.setenv("JAXCF_COORDINATOR", "10.0.0.1:1234")
    resolved = processes.resolve(cfg.DistributedConfig(process_id=1))
    assert resolved == cfg.DistributedConfig("10.0.0.1:1234", 4, 1)  # the config wins over the environment
    for bad in ("two", "0"):
        monkeypatch.setenv("JAXCF_NUM_PROCESSES", bad)
        with pytest.raises(cfg.ConfigError, match=rf"JAXCF_NUM_PROCESSES='{bad}': expected an integer >= 1"):
            processes.resolve(cfg.DistributedConfig())
    monkeypatch.delenv("JAXCF_COORDINATOR")
    with pytest.raises(cfg.ConfigError, match="set distributed.coordinator_address"):
        processes.initialize(cfg.DistributedConfig(num_processes=2, process_id=0))
    with pytest.raises(cfg.ConfigError, match=r"must be 0\.\.1 for 2 processes; got 2"):
        processes.initialize(cfg.DistributedConfig("127.0.0.1:1", 2, 2))


# After the refused restore, orbax's abandoned read coroutines may be collected once their event
# loop is closed ("Event loop is closed", ignored by Python): orbax's clean-up, not a failure here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restore_pads_or_truncates_rows_and_nothing_else(tmp_path):
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    saved = {"table": jax.numpy.asarray(table), "step": jax.numpy.asarray(3, jax.numpy.int32)}
    with checkpoint.manager(tmp_path) as mngr:
        checkpoint.save(mngr, 1, saved, {"epoch": 1})

    def target(rows, cols=2):
        return {"table": jax.ShapeDtypeStruct((rows, cols), np.float32, sharding=saved["table"].sharding),
                "step": jax.ShapeDtypeStruct((), np.int32, sharding=saved["step"].sharding)}

    with checkpoint.manager(tmp_path) as mngr:
        padded, progress = checkpoint.restore(mngr, 1, target(8))
        truncated, _ = checkpoint.restore(mngr, 1, target(5))
        same, _ = checkpoint.restore(mngr, 1, saved)
        with pytest.raises(checkpoint.CheckpointError, match="cannot be restored"):
            checkpoint.restore(mngr, 1, target(6, cols=3))
    assert progress == {"epoch": 1} and int(padded["step"]) == 3
    np.testing.assert_array_equal(padded["table"], np.concatenate([table, np.zeros((2, 2), np.float32)]))
    np.testing.assert_array_equal(truncated["table"], table[:5])
    np.testing.assert_array_equal(same["table"], table)


# ------------------------------------------------------------------------------ 8 devices, one process


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker_cases.CASES))
def test_sharded_training_matches_one_device(name, cases, worker, bundled):
    case = cases[name]
    single_overrides = [o for o in case["overrides"] if not o.startswith("mesh.")]
    config = cfg.load("bias.yaml", single_overrides)
    setup = sgd.make_setup(config, bundled)
    family = sgd.family(setup, None, orders=worker_cases.subset_orders(config, len(setup.train_rows)))
    state, progress = trainer.train(family, config, family.init())
    with np.load(worker / f"{name}.npz", allow_pickle=False) as saved:
        sharded = dict(saved)
    # Same (unpadded) shapes: the padding rows never reach the caller.
    _assert_params_close(sharded, {k: np.asarray(v) for k, v in state.params.items()}, ATOL_CASES)
    _assert_metrics_close(case["history"], progress.history)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker_cases.CASES))
def test_each_device_holds_one_model_th_of_every_table_and_its_optimizer_state(name, cases, bundled):
    case = cases[name]
    data, model = case["mesh"]["data"], case["mesh"]["model"]
    ratings = bundled.ratings
    tables = 0
    for path, leaf in case["shards"].items():
        assert leaf["devices"] == data * model, path
        if not leaf["shape"]:
            assert leaf["fraction"] == 1.0, path  # step counts: replicated scalars
            continue
        tables += 1
        rows = leaf["shape"][0]
        real = ratings.num_users if rows - ratings.num_users in range(model) else ratings.num_items
        assert rows == -(-real // model) * model, f"{path}: {rows} rows stored for {real}"
        assert leaf["shard_shapes"] == [[rows // model, *leaf["shape"][1:]]], path
        assert leaf["fraction"] == pytest.approx(1 / model), path
    expected = {"adam": 3, "adamw": 3, "lazy_adam": 4}  # params, and mu, nu (and counts) per table
    optimizer = next(o.split("=")[1] for o in case["overrides"] if o.startswith("optim.name="))
    kind = next(o.split("=")[1] for o in case["overrides"] if o.startswith("model.kind="))
    assert tables == expected[optimizer] * (4 if kind == "bias" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", worker_cases.MEMORY_CASES)
def test_no_device_ever_holds_a_whole_table(name, cases):
    case = cases[name]
    memory, model = case["memory"], case["mesh"]["model"]
    whole = memory["logical_state_bytes"]
    total, largest = sum(whole.values()), max(whole.values())
    # The inputs of a device are its shard of the state (1/model of it) and its columns of the batches.
    state_bytes = memory["argument_bytes"] - memory["batch_bytes_per_device"]
    assert state_bytes <= total / model * 1.01 + 1024, (state_bytes, total, model)
    # A gathered table would need a temporary buffer of its size. The partitioned program needs
    # batch-sized buffers, plus (lazy_adam) one packed copy of the device's own shard.
    assert memory["temp_bytes"] < largest, (memory["temp_bytes"], largest)
    # So a device with half the memory that the whole state needs trains it (1/8 of the state in
    # its inputs, at most about as much again in temporaries).
    assert memory["argument_bytes"] + memory["temp_bytes"] < total / 2, (memory, total)


@pytest.mark.slow
def test_full_data_under_2x4_matches_one_device(worker, tmp_path):
    assert _cli(tmp_path / "single", "train.epochs=1") == 0
    _assert_metrics_close(_metrics(worker / "full"), _metrics(tmp_path / "single"))
    sharded, single = _weights(worker / "full"), _weights(tmp_path / "single")
    _assert_params_close(sharded, single, ATOL_FULL)  # also: the export has the real table sizes, no padding
    ids = [(folder / "model" / "ids.json").read_text() for folder in (worker / "full", tmp_path / "single")]
    assert ids[0] == ids[1]


@pytest.mark.slow
def test_a_checkpoint_resumes_under_other_meshes_and_on_one_device(worker, small_csv, tmp_path):
    common = [f"data.path={small_csv}", "model.n_factors=8"]
    run = tmp_path / "resumed"
    shutil.copytree(worker / "resume", run)
    # Epoch 1 under 2x4 (2,273 movies stored as 2,276 rows), epoch 2 under 1x8 (restored into
    # 2,280 rows), epoch 3 here on one device (truncated to 2,273).
    with checkpoint.manager(run) as mngr:
        assert mngr.latest_step() == 2
        saved = [checkpoint.ocp.StandardCheckpointHandler().metadata(mngr.directory / f"{e}" / "state") for e in (1, 2)]
    assert [tree.tree["train"]["params"]["item_embedding"].shape[0] for tree in saved] == [2276, 2280]
    assert _cli(run, *common, "train.epochs=3", resume=True) == 0
    assert _cli(tmp_path / "single", *common, "train.epochs=3") == 0
    _assert_metrics_close(_metrics(run), _metrics(tmp_path / "single"))
    _assert_params_close(_weights(run), _weights(tmp_path / "single"), ATOL_SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker_cases.FAMILY_CASES))
def test_every_family_trains_on_the_mesh_as_on_one_device(name, worker, small_csv, tmp_path):
    """A 4-member ensemble, the Gibbs sampler and iALS on 2x4 (both tables padded) against one device."""
    overrides = [f"data.path={small_csv}", *worker_cases.FAMILY_CASES[name]]
    assert _cli(tmp_path / "single", *overrides) == 0
    sharded, single = worker / f"family-{name}", tmp_path / "single"
    got, want = _metrics(sharded), _metrics(single)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        for key in FAMILY_METRICS.get(name, ("valid_rmse", "valid_mae")):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=FAMILY_METRIC_ATOL[name]), f"epoch {w['epoch']} {key}"
    _assert_params_close(_weights(sharded), _weights(single), FAMILY_ATOL[name])


# ------------------------------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_on_one_device(small_csv, tmp_path):
    workdir = tmp_path / "two"
    common = [f"data.path={small_csv}", "model.n_factors=8"]
    port = _free_port()
    command = [
        sys.executable, "-m", "jaxcf.train", "--config", "bias.yaml", "--workdir", str(workdir), "--quiet",
        "--set", *common, "train.epochs=2", "mesh.data=2", "mesh.model=2",
    ]
    procs = [
        subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(2, JAXCF_COORDINATOR=f"127.0.0.1:{port}", JAXCF_NUM_PROCESSES="2", JAXCF_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for i, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{err[-3000:]}"
    # Process 0 reports; process 1 trains just as much but prints no table.
    assert "valid_rmse" in outputs[0][0] and "valid_rmse" not in outputs[1][0].split("final")[0]
    assert _cli(tmp_path / "single", *common, "train.epochs=2") == 0
    _assert_metrics_close(_metrics(workdir), _metrics(tmp_path / "single"))
    _assert_params_close(_weights(workdir), _weights(tmp_path / "single"), ATOL_SMALL)

    # The checkpoint of the two processes (their shards in one folder) resumes in one process.
    assert _cli(workdir, *common, "train.epochs=3", resume=True) == 0
    assert _cli(tmp_path / "single3", *common, "train.epochs=3") == 0
    _assert_metrics_close(_metrics(workdir), _metrics(tmp_path / "single3"))
    _assert_params_close(_weights(workdir), _weights(tmp_path / "single3"), ATOL_SMALL)
