"""Untrusted files on the training side: checkpoints never unpickle, and damage is a clean error."""

import pickle
from pathlib import Path

import numpy as np
import pytest

from jaxcf.cli import train
from jaxcf.training import api

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
    state, progress = api.restore_checkpoint(two_epoch_run)
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
        if path.is_file() and path.stat().st_size > 0 and path.name != "MANIFEST":
            path.write_bytes(b"\x00garbage" + path.read_bytes()[: path.stat().st_size // 3])
            damaged += 1
    assert damaged
    capsys.readouterr()
    code = train.main([*ARGV, "train.epochs=3", "--workdir", str(two_epoch_run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "fails its integrity check" in err and "delete that folder" in err


def _largest_data_file(folder):
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST" and p.stat().st_size > 64]
    return max(files, key=lambda p: p.stat().st_size)


def test_one_flipped_byte_in_checkpoint_data_is_caught_on_resume(two_epoch_run, capsys):
    target = _largest_data_file(two_epoch_run / "checkpoints" / "2")
    payload = bytearray(target.read_bytes())
    payload[len(payload) // 2] ^= 0x01  # one bit, in the middle of the weights' data
    target.write_bytes(bytes(payload))
    before = (two_epoch_run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    code = train.main([*ARGV, "train.epochs=3", "--workdir", str(two_epoch_run), "--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "fails its integrity check" in err and target.name in err and "Traceback" not in err
    assert (two_epoch_run / "metrics.jsonl").read_bytes() == before  # nothing trained, nothing rewritten


def test_an_unsealed_checkpoint_is_skipped_for_the_one_before(two_epoch_run, capsys):
    (two_epoch_run / "checkpoints" / "2" / "MANIFEST").unlink()  # as if killed between the save and the seal
    capsys.readouterr()
    assert train.main([*ARGV, "train.epochs=3", "--workdir", str(two_epoch_run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "skipped the unsealed checkpoint of epoch 2" in out and "resumed from epoch 1" in out
