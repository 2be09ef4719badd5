"""Your own split (training, validation and test parts from files or frames), training on every row, never an
untrained answer, and ``python -m jaxcf.evaluate``.

Expected figures are computed here from the loaded model's own answers and NumPy, not through the metric code.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

import jaxcf
from jaxcf import config as cfg
from jaxcf import data
from jaxcf.cli import evaluate, predict, recommend, train
from jaxcf.core.errors import ConfigError, DataError
from jaxcf.serving import server as serve

SMALL = ["model.n_factors=8", "train.epochs=2"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The bundled data's default split written as a training and a test file (user, item, rating)."""
    folder = tmp_path_factory.mktemp("parts")
    dataset = data.load(cfg.DataConfig(), 42)
    r = dataset.ratings
    frame = pd.DataFrame({"userId": r.user_ids.raw[r.users], "movieId": r.item_ids.raw[r.items],
                          "rating": r.ratings})
    frame.iloc[dataset.split.train].to_csv(folder / "train.csv", index=False)
    frame.iloc[dataset.split.valid].to_csv(folder / "test.csv", index=False)
    return folder


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _rmse(values, targets):
    diff = np.asarray(values, np.float64) - np.asarray(targets, np.float64)
    return math.sqrt(float(np.mean(diff * diff)))


def test_own_train_and_test_files_evaluate_and_predict_agree(parts, tmp_path, capsys):
    """The done-when of the split issue: test_rmse, evaluate's rmse and the user's own RMSE agree to 1e-6."""
    run = tmp_path / "run"
    argv = ["--config", "bias.yaml", "--workdir", str(run), "--quiet", "--set", *SMALL,
            f"data.path={parts / 'train.csv'}", f"data.test_path={parts / 'test.csv'}", "data.valid_fraction=0"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "test_rmse" in out.splitlines()[0] and "valid_rmse" not in out and "final test_rmse" in out
    last = _records(run)[-1]
    assert not any(key.startswith("valid_") for key in last)  # nothing was validated
    assert last["test_rows"] == 20_000 and last["test_rows_known"] == 20_000 - 742
    assert evaluate.main(["--model", str(run), "--ratings", str(parts / "test.csv"), "--json",
                          str(tmp_path / "e.json")]) == 0
    found = json.loads((tmp_path / "e.json").read_text())
    test = pd.read_csv(parts / "test.csv")
    answers = jaxcf.load_model(run).predict(test.userId.tolist(), test.movieId.tolist())
    own = _rmse(answers.ratings, test.rating)
    assert abs(found["rmse"] - last["test_rmse"]) <= 1e-6 and abs(own - last["test_rmse"]) <= 1e-6
    assert found["rows"] == 20_000 and found["rows_known"] == 20_000 - 742 and found["rows_fallback"] == 742
    assert int(answers.fallback.sum()) == 742
    known = ~answers.fallback
    assert found["rmse_known"] == pytest.approx(_rmse(answers.ratings[known], test.rating[known]), abs=1e-9)
    assert found["ndcg@10"] == pytest.approx(last["test_ndcg@10"], abs=1e-12)


def test_every_validation_pair_with_an_untrained_id_is_a_flagged_fallback(tmp_path):
    run = tmp_path / "run"
    assert train.main(["--config", "dot.yaml", "--workdir", str(run), "--quiet", "--set", *SMALL]) == 0
    model = jaxcf.load_model(run)
    dataset = data.load(cfg.DataConfig(), 42)
    r, split = dataset.ratings, dataset.split
    trained_users = np.bincount(r.users[split.train], minlength=r.num_users) > 0
    trained_items = np.bincount(r.items[split.train], minlength=r.num_items) > 0
    users, items = r.users[split.valid], r.items[split.valid]
    untrained = ~(trained_users[users] & trained_items[items])
    assert untrained.sum() == 742  # every one of them has a table row
    answers = model.predict(r.user_ids.raw[users].tolist(), r.item_ids.raw[items].tolist())
    np.testing.assert_array_equal(answers.fallback, untrained)
    # Each is the documented fallback (the user's mean prediction), never the untrained row's score.
    rows = model.user_embedding[users[untrained]] @ model.item_embedding[items[untrained]].T
    assert not np.allclose(answers.ratings[untrained], np.diagonal(rows), atol=1e-3)
    last = _records(run)[-1]
    assert last["valid_rmse"] == pytest.approx(_rmse(answers.ratings, r.ratings[split.valid]), abs=1e-6)
    assert last["valid_rmse_known"] == pytest.approx(
        _rmse(answers.ratings[~untrained], r.ratings[split.valid][~untrained]), abs=1e-6)
    assert last["valid_rows_known"] == len(users) - 742


def test_a_validation_file_and_a_test_frame_from_python(parts):
    train_frame = pd.read_csv(parts / "train.csv")
    valid, test = train_frame.iloc[:5000], pd.read_csv(parts / "test.csv").iloc[:3000]
    model = jaxcf.fit(train_frame.iloc[5000:], valid=valid, test=test, overrides=SMALL, quiet=True)
    last = model.history[-1]
    assert last["valid_rows"] == 5000 and last["test_rows"] == 3000
    assert model.history[0]["valid_rows"] == 5000  # validation is scored every epoch
    assert last["test_rmse"] == pytest.approx(model.evaluate(test)["rmse"], abs=1e-6)
    # A path for the test part is recorded in the run's config.
    model = jaxcf.fit(parts / "train.csv", test=parts / "test.csv", overrides=[*SMALL, "data.valid_fraction=0.1"],
                      quiet=True)
    assert model.metadata["config"]["data"]["test_path"] == str(parts / "test.csv")
    assert model.history[-1]["valid_rows"] == int(80_004 * 0.1) and model.history[-1]["test_rows"] == 20_000
    with pytest.raises(ConfigError, match="go with your own training data"):
        jaxcf.fit(None, test=test, overrides=SMALL)


def test_training_on_every_row_validates_nothing_and_refuses_early_stopping(tmp_path):
    model = jaxcf.fit(None, overrides=[*SMALL, "data.valid_fraction=0"], quiet=True)
    last = model.history[-1]
    assert not any(k.startswith(("valid_", "test_")) for k in last) and math.isfinite(last["train_loss"])
    assert model.user_trained.all() and model.item_trained.all()  # every rating trained
    with pytest.raises(ConfigError, match="early_stopping_patience needs validation"):
        jaxcf.fit(None, overrides=["data.valid_fraction=0", "train.early_stopping_patience=2"])
    with pytest.raises(ConfigError, match="early_stopping_patience needs validation"):  # a named fold: test only
        cfg.load("bias.yaml", ["data.name=ml-100k", "data.split=u1", "train.early_stopping_patience=2"])


def test_a_named_fold_s_test_part_is_a_test_set(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--config", "bias.yaml", "--workdir", str(run), "--quiet", "--set", *SMALL,
                       "data.name=ml-100k", "data.split=u1"]) == 0
    last = _records(run)[-1]
    assert last["test_rows"] == 20_000 and "valid_rmse" not in last
    assert "final test_rmse" in capsys.readouterr().out


def test_ids_only_in_the_test_part_are_fallbacks(tmp_path):
    train_frame = pd.DataFrame({"userId": [1, 1, 2, 2, 3], "movieId": [10, 11, 10, 12, 11], "rating": [4, 3, 5, 2, 1]})
    test = pd.DataFrame({"userId": [1, 9, 3], "movieId": [99, 10, 12], "rating": [3.0, 4.0, 2.0]})
    model = jaxcf.fit(train_frame, test=test, overrides=[*SMALL, "data.valid_fraction=0"], quiet=True)
    answers = model.predict([1, 9, 3], [99, 10, 12])
    assert answers.fallback.tolist() == [True, True, False]
    assert model.num_users == 4 and model.num_items == 4  # rows exist for 9 and 99, untrained
    assert model.history[-1]["test_rows_known"] == 1


def test_split_refusals_are_one_line(tmp_path, capsys):
    assert train.main(["--config", "bias.yaml", "--quiet", "--workdir", str(tmp_path / "a"), "--set",
                       f"data.valid_path={tmp_path / 'v.csv'}"]) == 2
    assert "data.valid_path and data.test_path go with your own training file" in capsys.readouterr().err
    (tmp_path / "t.csv").write_text("userId,movieId,rating\n1,2,3\n")
    assert train.main(["--config", "bias.yaml", "--quiet", "--workdir", str(tmp_path / "b"), "--set",
                       f"data.path={tmp_path / 't.csv'}", f"data.valid_path={tmp_path / 'missing.csv'}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing.csv: file not found" in err
    with pytest.raises(DataError, match="data.leave_last chooses validation rows"):
        data.from_frame(pd.read_csv(tmp_path / "t.csv"), cfg.DataConfig(leave_last=1), 0, valid=tmp_path / "t.csv")


def test_evaluate_cli_errors_are_one_line(parts, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--config", "bias.yaml", "--workdir", str(run), "--quiet", "--set", *SMALL]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("userId,movieId,rating\n1,31,high\n")
    for argv in (["--ratings", str(bad)], ["--ratings", str(tmp_path / "nope.csv")],
                 ["--ratings", str(parts / "test.csv"), "--json", str(tmp_path)]):
        assert evaluate.main(["--model", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    other = tmp_path / "other.csv"
    other.write_text("who,what,stars\n1,31,4\n999999,31,3\n")
    assert evaluate.main(["--model", str(run), "--ratings", str(other), "--user-col", "who", "--item-col", "what",
                          "--rating-col", "stars"]) == 0
    out = capsys.readouterr().out
    assert "2 rows: 1 with a trained user and item, 1 answered by the fallback" in out


def test_recommend_reads_the_model_s_columns_and_checks_the_user(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--config", "bias.yaml", "--workdir", str(run), "--quiet", "--set", *SMALL]) == 0
    capsys.readouterr()
    mine = tmp_path / "mine.csv"
    mine.write_text("movieId,rating\n260,5\n1196,5\n2571,4\n")
    assert recommend.main(["--model", str(run), "--user", "9001", "--ratings", str(mine), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "folded in user 9001 (new)" in out and "top 3 for user 9001" in out
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("userId,movieId,rating\n9001,260,5\n42,1196,5\n")
    assert recommend.main(["--model", str(run), "--user", "9001", "--ratings", str(theirs)]) == 2
    err = capsys.readouterr().err
    assert "names user(s) 42, not --user 9001" in err and len(err.strip().splitlines()) == 1


def test_implicit_models_say_what_they_are(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--config", "ials.yaml", "--workdir", str(run), "--quiet", "--set", "model.n_factors=8",
                       "train.epochs=2"]) == 0
    model = jaxcf.load_model(run)
    assert model.kind == "ials" and model.feedback == "implicit" and "kind='ials'" in repr(model)
    capsys.readouterr()
    assert predict.main(["--model", str(run), "--user", "1", "--item", "1029"]) == 0
    out = capsys.readouterr().out
    assert ": score " in out and "rating" not in out
    app = serve.create_app(model)
    assert _asgi(app, "GET", "/health")["kind"] == "ials"
    body = _asgi(app, "POST", "/predict", {"users": [1], "items": [1029]})
    assert "scores" in body and "ratings" not in body
    found = model.evaluate(_implicit_frame())
    assert found["rows_interactions"] > 0 and 0 < found["ndcg@20"] < 1


def _asgi(app, method, path, body=None):
    """One request to an ASGI app in this process (routes that need no lifespan): the JSON answer."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode() if body is not None else b"",
                "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
             "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def _implicit_frame():
    dataset = data.load(cfg.DataConfig(), 42)
    r = dataset.ratings
    rows = dataset.split.valid
    return pd.DataFrame({"userId": r.user_ids.raw[r.users[rows]], "movieId": r.item_ids.raw[r.items[rows]],
                         "rating": r.ratings[rows]})
