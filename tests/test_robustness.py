"""The defects a careful user found, each a test: exact ids, changed data on resume, exports replaced
as a whole, an untrusted metadata.json, unbounded reads, one-line errors, the watchdog."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from jaxcf.cli import predict, recommend, similar, train
from jaxcf.cli import report as report_cli
from jaxcf.core.errors import ModelError, UnknownIdError
from jaxcf.serving import export, report
from jaxcf.serving.inference import load_model

ROOT = Path(__file__).parents[1]
QUIET = ["--quiet", "--set", "model.n_factors=2", "train.epochs=1", "train.batch_size=8"]


def write_csv(path: Path, rows, header="userId,movieId,rating") -> Path:
    path.write_text(header + "\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows))
    return path


def grid(users, items, seed=0):
    """Every user rates every item, ratings 1-5: enough rows for any split."""
    rng = np.random.default_rng(seed)
    return [(u, i, int(rng.integers(1, 6))) for u in users for i in items]


def _train(workdir, csv, *extra):
    return train.main(["--config", "bias.yaml", "--workdir", str(workdir), *QUIET, f"data.path={csv}", *extra])


# ------------------------------------------------------------------------------ ids, exactly


def test_integer_ids_beyond_2_to_the_53_are_exact_on_the_command_line(tmp_path, capsys):
    base = 2**53
    users = [base, base + 1, base + 2, base + 3]  # floats would merge base and base + 1
    csv = write_csv(tmp_path / "big.csv", grid(users, [1, 2, 3, 4, 5]))
    assert _train(tmp_path / "run", csv) == 0
    model = load_model(tmp_path / "run")
    assert model.user_ids.raw.dtype == np.int64 and model.user_ids.raw.tolist() == users
    for user in users:
        index, known = model.lookup_users(str(user))
        assert known[0] and model.user_ids.raw[index[0]] == user, user
        expected = model.predict([user], [3]).ratings[0]
        capsys.readouterr()
        assert predict.main(["--model", str(tmp_path / "run"), "--user", str(user), "--item", "3", "--strict"]) == 0
        assert f"{expected:.4f}" in capsys.readouterr().out
    # An id that exists nowhere does not pass --strict, whatever its size.
    for missing in (str(base + 5), str(2**70), "1e1", "0x10"):
        assert predict.main(["--model", str(tmp_path / "run"), "--user", missing, "--item", "3", "--strict"]) == 2
        err = capsys.readouterr().err
        assert "unknown user id" in err and "\n" not in err.strip()


def test_ids_beyond_int64_stay_distinct(tmp_path):
    users = [2**63 + k for k in range(20)]  # 20 users that a float would make one
    csv = write_csv(tmp_path / "huge.csv", grid(users, [1, 2, 3]))
    assert _train(tmp_path / "run", csv) == 0
    model = load_model(tmp_path / "run")
    assert model.num_users == 20 and model.user_ids.raw.tolist() == [str(u) for u in users]
    assert model.lookup_users(str(2**63 + 7))[1][0] and model.lookup_users(2**63 + 7)[1][0]


def test_ids_are_kept_as_written(tmp_path, capsys):
    rows = grid(["007", "7", "10", "10.0", "11"], [1, 2, 3, 4])
    csv = write_csv(tmp_path / "texts.csv", rows)
    assert _train(tmp_path / "run", csv) == 0
    model = load_model(tmp_path / "run")
    assert model.user_ids.raw.tolist() == ["007", "7", "10", "10.0", "11"]
    capsys.readouterr()
    assert recommend.main(["--model", str(tmp_path / "run"), "--user", "10", "--strict"]) == 0
    assert "top" in capsys.readouterr().out
    assert model.lookup_users(["007", "7", 7, "10.0", 10])[1].tolist() == [True, True, True, True, True]
    assert model.lookup_users(["07", "1e1"])[1].tolist() == [False, False]


def test_a_number_written_differently_names_no_integer_id(tmp_path):
    csv = write_csv(tmp_path / "ints.csv", grid([10, 11, 12], [1, 2, 3, 4]))
    assert _train(tmp_path / "run", csv) == 0
    model = load_model(tmp_path / "run")
    assert model.lookup_users(["10", 10, 10.0, np.int64(10)])[1].all()
    assert not model.lookup_users(["1e1", "010", "+10", " 10", 10.5, True, None, 2**70])[1].any()


def test_strict_lookups_of_odd_values_raise_unknown_id(tmp_path):
    csv = write_csv(tmp_path / "ints.csv", grid([10, 11, 12], [1, 2, 3, 4]))
    assert _train(tmp_path / "run", csv) == 0
    model = load_model(tmp_path / "run")
    for odd in (None, 2**70, float("nan"), object()):
        with pytest.raises(UnknownIdError):
            model.predict([odd], [1], strict=True)


# ------------------------------------------------------------------------------ resume and data


@pytest.mark.parametrize("change", ["bigger", "smaller", "shuffled"])
def test_resume_refuses_changed_data_and_says_what_changed(change, tmp_path, capsys):
    rows = grid(range(1, 11), range(1, 9))
    csv = write_csv(tmp_path / "r.csv", rows)
    assert _train(tmp_path / "run", csv) == 0
    changed = {"bigger": rows + [(11, 1, 3)], "smaller": rows[:-1],
               "shuffled": [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]}[change]
    write_csv(csv, changed)
    capsys.readouterr()
    code = train.main(["--config", "bias.yaml", "--workdir", str(tmp_path / "run"), *QUIET, f"data.path={csv}",
                       "train.epochs=2", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "the data changed since the run started" in err and "\n" not in err.strip()
    assert "checksum" in err


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path, capsys):
    csv = write_csv(tmp_path / "r.csv", grid(range(1, 11), range(1, 9)))
    assert _train(tmp_path / "run", csv, "train.epochs=3") == 0
    capsys.readouterr()
    code = train.main(["--config", "bias.yaml", "--workdir", str(tmp_path / "run"), *QUIET, f"data.path={csv}",
                       "train.epochs=2", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "has done 3 epochs, more than train.epochs=2" in err


def test_resume_refuses_a_new_length_for_a_scheduled_run(tmp_path, capsys):
    csv = write_csv(tmp_path / "r.csv", grid(range(1, 11), range(1, 9)))
    assert _train(tmp_path / "run", csv, "optim.schedule=cosine", "train.epochs=2") == 0
    capsys.readouterr()
    code = train.main(["--config", "bias.yaml", "--workdir", str(tmp_path / "run"), *QUIET, f"data.path={csv}",
                       "optim.schedule=cosine", "train.epochs=4", "--resume"])
    assert code == 2 and "learning-rate schedule depends on it" in capsys.readouterr().err


@pytest.mark.parametrize("workdir", ["", "."])
def test_an_empty_workdir_is_refused(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train.main(["--config", "bias.yaml", "--workdir", workdir, *QUIET]) == 2
    assert "give a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert train.main(["--config", "bias.yaml", "--workdir", str(blocker / "run"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "\n" not in err.strip() and "Traceback" not in err


def test_a_full_disk_while_checkpointing_is_one_line(tmp_path, capsys, monkeypatch):
    from jaxcf.training import checkpoint

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full)
    csv = write_csv(tmp_path / "r.csv", grid(range(1, 11), range(1, 9)))
    assert _train(tmp_path / "run", csv) == 2
    err = capsys.readouterr().err
    assert "cannot write the checkpoint of epoch 1" in err and "no space left" in err.lower()
    assert "\n" not in err.strip()


# ------------------------------------------------------------------------------ exports


@pytest.fixture()
def run(tmp_path):
    csv = write_csv(tmp_path / "r.csv", grid(range(1, 11), range(1, 9)))
    assert _train(tmp_path / "run", csv) == 0
    return tmp_path / "run"


def test_a_failed_re_export_leaves_the_previous_export_intact(run, monkeypatch):
    model = load_model(run)
    before = {p.name: p.read_bytes() for p in (run / "model").iterdir()}
    real = Path.write_bytes
    calls = []

    def fill_up(self, data):
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", fill_up)
    with pytest.raises(OSError):
        model.save(run)
    monkeypatch.setattr(Path, "write_bytes", real)
    assert {p.name: p.read_bytes() for p in (run / "model").iterdir()} == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".model")] == []  # no staging left behind
    load_model(run)


def _rewrite(folder: Path, name: str, payload: bytes) -> None:
    """Replaces a file and updates its size and sha256 in metadata.json: a 'correctly checksummed' change."""
    (folder / name).write_bytes(payload)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["files"][name] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (folder / "metadata.json").write_text(json.dumps(meta))


def _edit_metadata(folder: Path, edit) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    edit(meta)
    (folder / "metadata.json").write_text(json.dumps(meta))


def _copy(run, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(run / "model", folder)
    return folder


@pytest.mark.parametrize("field, value, message", [
    ("y_range", [0.5, float("inf")], "y_range"),
    ("y_range", [5.0, 0.5], "y_range"),
    ("y_range", [0.5, 7.0], "y_range"),
    ("kind", "dot", "kind"),
    ("num_users", 11, "num_users"),
    ("n_factors", 3, "n_factors"),
])
def test_metadata_fields_that_change_predictions_must_agree_with_the_weights(run, tmp_path, field, value, message):
    folder = _copy(run, tmp_path)
    _edit_metadata(folder, lambda meta: meta["model"].__setitem__(field, value))
    with pytest.raises(ModelError, match=message) as err:
        load_model(folder)
    assert "\n" not in str(err.value)


def test_single_bit_flips_in_metadata_never_change_predictions_silently(run, tmp_path):
    reference = load_model(run).predict([1, 2, 3], [1, 2, 3]).ratings
    text = (run / "model" / "metadata.json").read_bytes()
    model_section = text.index(b'"model"')
    rng = np.random.default_rng(0)
    for k, position in enumerate(rng.integers(model_section, model_section + 400, 40)):
        folder = tmp_path / f"flip{k}"
        shutil.copytree(run / "model", folder)
        flipped = bytearray(text)
        flipped[position] ^= 1 << int(rng.integers(0, 7))
        (folder / "metadata.json").write_bytes(bytes(flipped))
        try:
            model = load_model(folder)
        except ModelError:
            continue
        np.testing.assert_array_equal(model.predict([1, 2, 3], [1, 2, 3]).ratings, reference)


@pytest.mark.parametrize("name, payload", [
    ("ids.json", b'{"users": [{"a": 1}], "items": []}'),
    ("ids.json", b'{"users": [1, 1, 2], "items": [1]}'),
    ("ids.json", b'{"users": [true, false], "items": [1]}'),
    ("ids.json", b"[1, 2, 3]"),
    ("items.json", b'{"titles": [[1, 2, 3]]}'),
    ("seen.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
    ("weights.safetensors", b"garbage"),
])
def test_checksummed_but_malformed_contents_are_one_line(run, tmp_path, name, payload):
    folder = _copy(run, tmp_path)
    _rewrite(folder, name, payload)
    with pytest.raises(ModelError) as err:
        load_model(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_non_finite_weights_are_refused(run, tmp_path):
    folder = _copy(run, tmp_path)
    weights = safetensors.numpy.load_file(folder / "weights.safetensors")
    weights["item_bias"][0, 0] = np.nan
    with open(folder / "weights.safetensors", "rb") as handle:
        header = export._weights_header(handle.read())
    _rewrite(folder, "weights.safetensors", safetensors.numpy.save(weights, metadata=header))
    with pytest.raises(ModelError, match="item_bias holds NaN"):
        load_model(folder)


def _load_in_thread(folder, seconds=20):
    result = {}

    def target():
        try:
            load_model(folder)
            result["ok"] = True
        except Exception as err:  # noqa: BLE001 (the test inspects it)
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "load_model blocked"
    return result


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(run, tmp_path):
    folder = _copy(run, tmp_path)
    (folder / "ids.json").unlink()
    os.mkfifo(folder / "ids.json")
    result = _load_in_thread(folder)
    assert isinstance(result.get("error"), ModelError) and "not a regular file" in str(result["error"])


def test_a_file_pointing_at_dev_zero_is_refused_before_reading(run, tmp_path):
    folder = _copy(run, tmp_path)
    (folder / "weights.safetensors").unlink()
    os.symlink("/dev/zero", folder / "weights.safetensors")
    result = _load_in_thread(folder)
    assert isinstance(result.get("error"), ModelError) and "not a regular file" in str(result["error"])


def test_a_metadata_json_declaring_a_huge_file_is_refused(run, tmp_path):
    folder = _copy(run, tmp_path)
    _edit_metadata(folder, lambda meta: meta["files"]["ids.json"].__setitem__("bytes", 10**15))
    with pytest.raises(ModelError, match="ids.json"):
        load_model(folder)


# ------------------------------------------------------------------------------ inference arguments


def test_bad_arguments_of_the_api_are_value_errors(run):
    model = load_model(run)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        model.bias_ranking(k=-1)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        model.recommend(1, k=0)
    with pytest.raises(ValueError, match="one item id"):
        model.similar_items([1, 2])


def test_recommend_counts_distinct_items_when_ratings_repeat(tmp_path, capsys):
    rows = grid(range(1, 11), range(1, 9))
    rows += [(1, 1, 5), (1, 1, 4), (1, 2, 3)]  # user 1 rated item 1 three times and item 2 twice
    csv = write_csv(tmp_path / "dup.csv", rows)
    assert _train(tmp_path / "run", csv) == 0
    model = load_model(tmp_path / "run")
    index = int(model.lookup_users(1)[0][0])
    seen = model.seen(index)
    assert len(seen) == len(set(seen.tolist()))
    capsys.readouterr()
    assert recommend.main(["--model", str(tmp_path / "run"), "--user", "1", "--k", "3"]) == 0
    assert f"excluding the {len(seen)} items they rated" in capsys.readouterr().out


def test_similar_cli_with_k_zero_is_one_line(run, capsys):
    assert similar.main(["--model", str(run), "--item", "1", "--k", "0"]) == 2
    assert "--k must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------ reports


@pytest.mark.parametrize("case", ["one factor", "one item", "two ratings"])
def test_reports_of_small_models(case, tmp_path):
    rows = {"one factor": grid(range(1, 6), range(1, 5)), "one item": grid(range(1, 11), [1]),
            "two ratings": [(1, 1, 4), (2, 2, 3)]}[case]
    csv = write_csv(tmp_path / "small.csv", rows)
    extra = ["model.n_factors=1"] if case == "one factor" else ["data.valid_fraction=0.5"]
    assert _train(tmp_path / "run", csv, *extra) == 0
    assert report_cli.main(["--model", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report" / "report.md").is_file()


def test_a_failed_report_leaves_no_partial_folder(run, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "plot_embedding_map", broken)
    assert report_cli.main(["--model", str(run), "--out", str(run / "rep")]) == 2
    err = capsys.readouterr().err
    assert "No space left" in err and "\n" not in err.strip()
    assert not (run / "rep").exists() and not [p for p in run.iterdir() if p.name.startswith(".rep")]


# ------------------------------------------------------------------------------ the watchdog


def test_a_stalled_epoch_dumps_every_stack_and_exits_3(tmp_path):
    script = f"""
import time
from jaxcf import config, data, families
from jaxcf.training import loop as trainer

cfg = config.load("bias.yaml", ["train.epochs=3", "model.n_factors=2", "train.stall_seconds=10"])
dataset = data.load(cfg.data, cfg.seed)
real = families.build

def stalling(*args, **kwargs):
    family = real(*args, **kwargs)
    def epoch(state, number):
        if number == 1:
            time.sleep(600)  # a kernel that never returns
        return family_epoch(state, number)
    family_epoch = family.epoch
    family.epoch = epoch
    return family

families.build = stalling
trainer.fit(cfg, families, dataset, workdir={str(tmp_path / "run")!r}, quiet=True, on_stall="exit")  # as the CLI
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error: epoch 2 made no progress for") and "--resume" in lines[0]
    assert any("Thread" in line for line in lines[1:]) and any("time.sleep" in line or "epoch" in line
                                                               for line in lines[1:])
    # The epoch before the stall was checkpointed: the run can continue.
    assert (tmp_path / "run" / "checkpoints" / "1" / "MANIFEST").is_file()


def test_a_stall_in_jaxcf_fit_raises_and_never_ends_the_caller(tmp_path):
    """From Python the watchdog raises TrainingStalled in the caller's thread; the interpreter lives on."""
    script = """
import time
import jaxcf
from jaxcf import families

real = families.build

def stalling(*args, **kwargs):
    family = real(*args, **kwargs)
    family_epoch = family.epoch
    def epoch(state, number):
        if number == 1:
            for _ in range(6000):  # 10 minutes of Python that makes no progress
                time.sleep(0.1)
        return family_epoch(state, number)
    family.epoch = epoch
    return family

families.build = stalling
try:
    jaxcf.fit(None, overrides=["train.epochs=3", "model.n_factors=2", "train.stall_seconds=10"], quiet=True)
except jaxcf.TrainingStalled as err:
    print("raised:", err)
print("the interpreter lives on")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("raised: epoch 2 made no progress for") and lines[-1] == "the interpreter lives on"


# ------------------------------------------------------------------------------ the progress bar


def test_the_progress_bar_keeps_out_of_logs_and_is_labelled_by_family(tmp_path, monkeypatch):
    """A redirected stderr gets the table alone (no bar, no carriage returns); on a terminal the bar is
    drawn, labelled by the model family (``bias``, never the optimizer's ``sgd``), and the table's
    rows are written above it, whole lines."""
    import io

    import jaxcf
    from jaxcf.training import workdir as wd

    frame = jaxcf.ratings_frame().iloc[:3000]
    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stderr", redirected)
    jaxcf.fit(frame, overrides=["train.epochs=2"])
    assert not wd.interactive() and "\r" not in redirected.getvalue() and "epoch" not in redirected.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert wd.interactive()
    jaxcf.fit(frame, overrides=["train.epochs=2"])
    drawn = terminal.getvalue()
    assert "bias:" in drawn and "sgd" not in drawn and "epoch" in drawn
