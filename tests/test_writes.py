"""No write deletes what it did not create: saving a model, writing a report, ``recommend --save`` and a run's
export each replace only a missing or empty folder or one of their own kind; anything else is one line."""

import os

import pytest

import jaxcf
from jaxcf.cli import recommend, train
from jaxcf.cli import report as report_cli
from jaxcf.core.errors import ModelError

SMALL = ["model.n_factors=4", "train.epochs=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    assert train.main(["--config", "bias.yaml", "--workdir", str(path), "--quiet", "--set", *SMALL]) == 0
    return path


def _tree(folder):
    return sorted((p.relative_to(folder).as_posix(), p.read_bytes() if p.is_file() else b"") for p in
                  folder.rglob("*"))


def test_saving_never_replaces_what_jaxcf_did_not_write(run, tmp_path, monkeypatch):
    model = jaxcf.load_model(run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    note = tmp_path / "note.txt"
    note.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(mine)
    before = _tree(tmp_path)
    with pytest.raises(ModelError, match="is not a model export jaxcf wrote"):
        model.save(mine)
    with pytest.raises(ModelError, match="is a file"):
        model.save(note)
    with pytest.raises(ModelError, match="symbolic link"):
        model.save(link)
    monkeypatch.chdir(mine)
    with pytest.raises(ModelError, match="not the current directory"):
        model.save(".")
    with pytest.raises(ModelError, match="current directory or one above it"):
        model.save(os.fspath(tmp_path))
    monkeypatch.undo()
    assert _tree(tmp_path) == before  # nothing deleted, nothing moved aside
    assert (mine / "thesis.tex").read_text() == "years of work" and note.read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden .NAME.*.new left behind
    # An empty folder and a previous export are fine; an export with a stray file is not.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert model.save(empty) == empty and jaxcf.load_model(empty).num_users == model.num_users
    assert model.save(empty) == empty  # replacing its own export
    (empty / "extra.txt").write_text("x")
    with pytest.raises(ModelError, match="holds other files"):
        model.save(empty)


def test_the_clis_refuse_before_any_work(run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("precious")
    ratings = tmp_path / "r.csv"
    ratings.write_text("movieId,rating\n260,5\n")
    for argv in (["--save", str(mine)], ["--save", "."], ["--save", str(ratings)]):
        assert recommend.main(["--model", str(run), "--user", "9001", "--ratings", str(ratings), *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert report_cli.main(["--model", str(run), "--out", str(mine)]) == 2
    assert "is not a report jaxcf wrote" in capsys.readouterr().err
    assert (mine / "data.csv").read_text() == "precious" and [p.name for p in mine.iterdir()] == ["data.csv"]
    assert report_cli.main(["--model", str(run), "--out", str(tmp_path / "report")]) == 0
    assert report_cli.main(["--model", str(run), "--out", str(tmp_path / "report")]) == 0  # its own report: replaced
    workdir = tmp_path / "w"
    (workdir / "model").mkdir(parents=True)
    (workdir / "model" / "notes.md").write_text("mine")
    assert train.main(["--config", "bias.yaml", "--workdir", str(workdir), "--quiet", "--set", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "choose another --workdir" in err and not (workdir / "config.yaml").exists()
    assert (workdir / "model" / "notes.md").read_text() == "mine"
