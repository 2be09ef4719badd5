"""Untrusted files on the training side: checkpoints never unpickle, and damage is a clean error."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from jaxcf import train
from jaxcf.config import load
from jaxcf.data import load as load_dataset

ARGV = ["--config", "bias.yaml", "--quiet", "--set", "model.n_factors=4", "checkpoint.keep=5"]


@pytest.fixture()
def two_epoch_run(tmp_path):
    workdir = tmp_path / "run"
    assert train.main([*ARGV, "train.epochs=2", "--workdir", str(workdir)]) == 0
    return workdir


def test_restoring_a_checkpoint_never_unpickles(two_epoch_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    config = load(two_epoch_run / "config.yaml")
    setup = train.make_setup(config, load_dataset(config.data, config.seed))
    state, progress = train.restore_checkpoint(two_epoch_run, setup)
    assert progress.epoch == 2 and np.isfinite(np.asarray(state.params["user_embedding"])).all()


def test_package_sources_use_no_unsafe_loaders():
    root = Path(__file__).parents[1]
    for path in [*root.joinpath("jaxcf").rglob("*.py"), *root.joinpath("reference_torch").rglob("*.py")]:
        text = path.read_text()
        for needle in ("import pickle", "pickle.load", "allow_pickle=True", "yaml.load(", "weights_only=False"):
            assert needle not in text, f"{path}: {needle}"


def test_a_damaged_checkpoint_is_a_one_line_error_on_resume(two_epoch_run, capsys):
    damaged = 0
    for path in (two_epoch_run / "checkpoints" / "2").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\x00garbage" + path.read_bytes()[: path.stat().st_size // 3])
            damaged += 1
    assert damaged
    capsys.readouterr()
    code = train.main([*ARGV, "train.epochs=3", "--workdir", str(two_epoch_run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "cannot be restored" in err and "delete that folder" in err
