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

from jaxcf.cli import train
from jaxcf.core import steps
from jaxcf.training import api, checkpoint

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
    """``uninterrupted(epochs)``: the workdir of a run of that many epochs (made once per count)."""
    runs = {}

    def get(epochs):
        if epochs not in runs:
            workdir = tmp_path_factory.mktemp(f"full{epochs}") / "run"
            done = subprocess.run(
                [sys.executable, "-m", "jaxcf.train", *SMALL, f"train.epochs={epochs}", "--workdir", str(workdir)],
                cwd=ROOT, capture_output=True, text=True, timeout=600,
            )
            assert done.returncode == 0, done.stderr
            runs[epochs] = workdir
        return runs[epochs]

    return get


def _assert_same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    assert _metrics(a) == _metrics(b)


def _checkpoints(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _resume_and_compare(workdir, uninterrupted):
    """Resumes to a few epochs past the last checkpoint and compares with a run that was never stopped."""
    target = max(3, _checkpoints(workdir)[-1] + 1 if _checkpoints(workdir) else 3)
    resumed = subprocess.run(
        [sys.executable, "-m", "jaxcf.train", *SMALL, f"train.epochs={target}", "--workdir", str(workdir), "--resume"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(uninterrupted(target), workdir)


@pytest.mark.parametrize("signal_number, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_checkpoints_exits_and_resumes_bitwise(signal_number, status, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    proc = _start(workdir, 50)
    _wait_for_epochs(workdir, 1, proc)
    proc.send_signal(signal_number)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "Traceback" not in err
    done = len((workdir / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 50, done  # the signal stopped the run
    assert _checkpoints(workdir)[-1] == done
    assert not (workdir / "model").exists()  # not finished, so not exported
    _resume_and_compare(workdir, uninterrupted)


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.3])
def test_sigkill_leaves_only_complete_checkpoints_and_resume_is_bitwise(delay, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    proc = _start(workdir, 50)
    _wait_for_epochs(workdir, 1, proc)
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # the kill landed, mid-run:
    assert not (workdir / "model").exists()
    assert len(_checkpoints(workdir)) < 50  # fewer checkpoints than epochs (possibly none yet)
    # Every sealed checkpoint restores completely.
    for step in _checkpoints(workdir):
        if not (workdir / "checkpoints" / str(step) / checkpoint.MANIFEST).exists():
            continue  # killed between the save and its seal: resume skips it
        state, progress = api.restore_checkpoint(workdir, step)
        assert progress.epoch == step and len(progress.history) == step
        assert all(np.isfinite(np.asarray(t)).all() for t in state.params.values())
    _resume_and_compare(workdir, uninterrupted)


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
    real_epoch = steps.make_train_epoch

    def diverging_epoch(*args, **kwargs):
        epoch = real_epoch(*args, **kwargs)

        def run(*a):
            state, losses = epoch(*a)
            return state, losses.at[3].set(jnp.nan)

        return run

    monkeypatch.setattr(steps, "make_train_epoch", diverging_epoch)
    capsys.readouterr()
    assert train.main([*argv, "train.epochs=4", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "training diverged in epoch 3" in err and "batch 4" in err
    with checkpoint.manager(workdir) as mngr:
        assert mngr.latest_step() == 2
    monkeypatch.setattr(steps, "make_train_epoch", real_epoch)
    state, _ = api.restore_checkpoint(workdir, 2)
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


def _train_cli(workdir, *overrides, config="dot.yaml"):
    return subprocess.run(
        [sys.executable, "-m", "jaxcf.train", "--config", config, "--quiet", "--workdir", str(workdir),
         "--set", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_divergence_in_the_last_update_of_an_epoch_is_caught(tmp_path):
    # One batch per epoch: its loss is computed before the update, so only the parameters show it.
    workdir = tmp_path / "run"
    done = _train_cli(workdir, "optim.learning_rate=1e30", "train.batch_size=80004", "train.epochs=2")
    assert done.returncode == 1, done.stderr
    # Adam's step is about lr whatever the gradient: the parameters reach 1e30 and the predictions overflow.
    assert "training diverged in epoch 1" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "final valid_rmse" not in done.stdout and not (workdir / "model").exists()
    metrics = workdir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds {name}, which is not JSON"))


def test_a_model_that_leaves_the_ratings_scale_is_diverged(tmp_path):
    # lr 1e3 keeps the dot model's numbers finite but predicts billions: not a model.
    done = _train_cli(tmp_path / "run", "optim.learning_rate=1e3", "train.epochs=2")
    assert done.returncode == 1, done.stderr
    assert "far outside the ratings' scale" in done.stderr and not (tmp_path / "run" / "model").exists()


def test_divergence_blames_the_data_when_the_ratings_are_huge(tmp_path):
    csv = tmp_path / "huge.csv"
    rows = [f"{u},{i},{(u * 7 + i) % 5 + 1}e20" for u in range(30) for i in range(20)]
    csv.write_text("userId,movieId,rating\n" + "\n".join(rows) + "\n")
    done = _train_cli(tmp_path / "run", f"data.path={csv}", "train.epochs=2")
    assert done.returncode == 1, done.stderr
    assert "rescale" in done.stderr and "Traceback" not in done.stderr
