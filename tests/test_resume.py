"""Every family resumes bitwise: stopped by SIGTERM after its second epoch, continued with --resume,
it ends with the weights and metrics of a run that was never stopped; and the Python API trains
exactly what the CLI trains."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.numpy

import jaxcf

ROOT = Path(__file__).parents[1]

# Each config runs long enough to be stopped mid-way; "epochs" is its full length.
FAMILIES = {
    "ensemble-4": ["--config", "bias.yaml", "--set", "ensemble.size=4", "model.n_factors=8",
                   "train.batch_size=1024", "train.epochs=6"],
    "row-l2-onecycle": ["--config", "bias.yaml", "--set", "optim.row_l2=0.05", "optim.schedule=onecycle",
                        "model.n_factors=8", "train.batch_size=256", "train.epochs=6"],
    "gibbs": ["--config", "bpmf.yaml", "--set", "data.name=ml-100k", "data.split=u1", "model.n_factors=4",
              "ensemble.size=4", "ensemble.chains=2", "ensemble.burn_in=4", "train.epochs=10"],
}


def _cli(args, workdir, *extra):
    return subprocess.Popen([sys.executable, "-m", "jaxcf.train", *args, "--quiet", "--workdir", str(workdir), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(workdir):
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in path.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_stops_after_two_epochs_and_resumes_bitwise(name, tmp_path):
    args = FAMILIES[name]
    full = _cli(args, tmp_path / "full")
    out, err = full.communicate(timeout=900)
    assert full.returncode == 0, err

    stopped = _cli(args, tmp_path / "stopped")
    deadline = time.monotonic() + 600
    while len(_records(tmp_path / "stopped")) < 2:
        assert stopped.poll() is None, stopped.communicate()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=600)
    assert stopped.returncode == 143, err
    done = len(_records(tmp_path / "stopped"))
    total = int(next(a for a in args if a.startswith("train.epochs=")).split("=")[1])
    assert 2 <= done < total, done  # it stopped mid-run, after a checkpoint of its last epoch
    assert not (tmp_path / "stopped" / "model").exists()

    resumed = _cli(args, tmp_path / "stopped", "--resume")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    assert f"resumed from epoch {done}" in out

    want = safetensors.numpy.load_file(tmp_path / "full" / "model" / "weights.safetensors")
    got = safetensors.numpy.load_file(tmp_path / "stopped" / "model" / "weights.safetensors")
    assert sorted(got) == sorted(want)
    for table in want:
        np.testing.assert_array_equal(got[table], want[table], err_msg=f"{name}: {table}")
    assert _records(tmp_path / "stopped") == _records(tmp_path / "full")


def test_fit_on_a_dataframe_gives_the_cli_s_validation_rmse(tmp_path, capsys):
    """``jaxcf.fit(df)`` on the bundled ratings is ``python -m jaxcf.train --config bias.yaml``."""
    from jaxcf.data import registry

    overrides = ["train.epochs=2"]
    from jaxcf.cli import train

    assert train.main(["--config", "bias.yaml", "--workdir", str(tmp_path / "cli"), "--quiet",
                       "--set", *overrides]) == 0
    cli = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    import io

    frame = pd.read_csv(io.BytesIO(registry.read_bundled("ml-latest-small-2016", "ratings.csv")))
    model = jaxcf.fit(frame, overrides=overrides, quiet=True)
    assert [r["epoch"] for r in model.history] == [r["epoch"] for r in cli]
    for mine, theirs in zip(model.history, cli):
        assert mine["valid_rmse"] == pytest.approx(theirs["valid_rmse"], abs=1e-6)
    # The same model: the CLI's export and the API's predictions agree.
    loaded = jaxcf.load_model(tmp_path / "cli")
    np.testing.assert_allclose(model.predict([1, 15, 671], [31, 260, 1]).ratings,
                               loaded.predict([1, 15, 671], [31, 260, 1]).ratings, rtol=0, atol=1e-6)
    # save() writes the export the CLI writes; load_model reads it back.
    saved = model.save(tmp_path / "api")
    again = jaxcf.load_model(saved)
    assert again.history == model.history
    np.testing.assert_array_equal(again.item_embedding, model.item_embedding)


def test_fit_accepts_a_path_a_config_object_and_raises_one_line_errors(tmp_path):
    csv = tmp_path / "r.csv"
    rng = np.random.default_rng(0)
    rows = [f"{u},{i},{int(rng.integers(1, 6))}" for u in range(1, 21) for i in range(1, 11)]
    csv.write_text("user,item,stars\n" + "\n".join(rows) + "\n")
    config = jaxcf.Config()
    overrides = ["data.user_col=user", "data.item_col=item", "data.rating_col=stars", "train.epochs=1",
                 "model.n_factors=2", "train.batch_size=16"]
    model = jaxcf.fit(csv, config, overrides, quiet=True)
    assert model.num_users == 20 and len(model.history) == 1
    with pytest.raises(jaxcf.DataError, match="missing column"):
        jaxcf.fit(pd.DataFrame({"a": [1], "b": [2], "c": [3.0]}), quiet=True)
    with pytest.raises(jaxcf.ConfigError, match="did you mean"):
        jaxcf.fit(csv, overrides=["optim.learnig_rate=1"], quiet=True)
    # A workdir makes the run resumable and writes what the CLI writes.
    model = jaxcf.fit(csv, config, overrides, workdir=tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "model" / "metadata.json").is_file() and model.path == tmp_path / "run" / "model"
