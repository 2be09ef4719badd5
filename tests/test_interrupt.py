"""Diverging, interrupted, killed and concurrent training runs: nothing is lost or half-written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxcf import checkpoint, train
from jaxcf.config import load

ROOT = Path(__file__).parents[1]
SMALL = ["--config", "bias.yaml", "--quiet"]
SMALL += ["--set", "model.n_factors=8", "checkpoint.every_epochs=1", "checkpoint.keep=50"]


def _start(workdir, epochs, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "jaxcf.train", *SMALL, f"train.epochs={epochs}", "--workdir", str(workdir), *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_epochs(workdir, count, proc, timeout=300):
    deadline = time.monotonic() + timeout
    metrics = Path(workdir) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for training progress")


def _weights(workdir):
    return safetensors.numpy.load_file(Path(workdir) / "model" / "weights.safetensors")


def _metrics(workdir):
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    done = subprocess.run(
        [sys.executable, "-m", "jaxcf.train", *SMALL, "train.epochs=3", "--workdir", str(workdir / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return workdir / "run"


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    assert _metrics(a) == _metrics(b)


def test_sigint_checkpoints_exits_130_and_resumes_bitwise(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    proc = _start(workdir, 50)
    _wait_for_epochs(workdir, 1, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "Traceback" not in err
    done = len((workdir / "metrics.jsonl").read_text().splitlines())
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == done
    assert not (workdir / "model").exists()  # not finished, so not exported
    if done >= 3:
        pytest.skip("the machine was too slow to interrupt before epoch 3")
    resumed = subprocess.run(
        [sys.executable, "-m", "jaxcf.train", *SMALL, "train.epochs=3", "--workdir", str(workdir), "--resume"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, workdir)


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.3])
def test_sigkill_leaves_only_complete_checkpoints_and_resume_is_bitwise(delay, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    proc = _start(workdir, 3)
    _wait_for_epochs(workdir, 1, proc)
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    # Every checkpoint orbax lists must restore completely.
    config = load(workdir / "config.yaml")
    from jaxcf.data import load as load_dataset

    setup = train.make_setup(config, load_dataset(config.data, config.seed))
    with checkpoint.manager(workdir) as mngr:
        steps = mngr.all_steps()
    for step in steps:
        state, progress = train.restore_checkpoint(workdir, setup, step)
        assert progress.epoch == step and len(progress.history) == step
        assert all(np.isfinite(np.asarray(t)).all() for t in state.params.values())
    resumed = subprocess.run(
        [sys.executable, "-m", "jaxcf.train", *SMALL, "train.epochs=3", "--workdir", str(workdir), "--resume"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted, workdir)


def test_a_second_process_on_a_busy_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    proc = _start(workdir, 50)
    try:
        _wait_for_epochs(workdir, 1, proc)
        before = (workdir / "config.yaml").read_bytes()
        second = subprocess.run(
            [sys.executable, "-m", "jaxcf.train", *SMALL, "train.epochs=50", "--workdir", str(workdir), "--resume"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert second.returncode == 2
        assert "in use by another training process" in second.stderr and "Traceback" not in second.stderr
        assert (workdir / "config.yaml").read_bytes() == before
    finally:
        proc.kill()
        proc.communicate()


def test_divergence_names_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    argv = ["--config", "bias.yaml", "--quiet", "--workdir", str(workdir), "--set", "model.n_factors=4"]
    assert train.main([*argv, "train.epochs=2"]) == 0
    good = _weights(workdir)
    real_epoch = train.make_train_epoch

    def diverging_epoch(*args, **kwargs):
        epoch = real_epoch(*args, **kwargs)

        def run(*a):
            state, losses = epoch(*a)
            return state, losses.at[3].set(jnp.nan)

        return run

    monkeypatch.setattr(train, "make_train_epoch", diverging_epoch)
    capsys.readouterr()
    assert train.main([*argv, "train.epochs=4", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "training diverged in epoch 3" in err and "batch 4" in err
    with checkpoint.manager(workdir) as mngr:
        assert mngr.latest_step() == 2
    monkeypatch.setattr(train, "make_train_epoch", real_epoch)
    config = load(workdir / "config.yaml")
    from jaxcf.data import load as load_dataset

    setup = train.make_setup(config, load_dataset(config.data, config.seed))
    state, _ = train.restore_checkpoint(workdir, setup, 2)
    for name in good:
        np.testing.assert_array_equal(np.asarray(state.params[name]), good[name], err_msg=name)


def test_a_huge_learning_rate_diverges_cleanly(tmp_path):
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "jaxcf.train", "--config", "dot.yaml", "--quiet", "--workdir", str(workdir),
         "--set", "optim.learning_rate=1e30", "train.epochs=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 1
    assert "training diverged in epoch 1" in done.stderr and "Traceback" not in done.stderr
    assert not (workdir / "model").exists()
    assert os.listdir(workdir / "checkpoints") == [] or all(
        not p.isdigit() for p in os.listdir(workdir / "checkpoints")
    )
