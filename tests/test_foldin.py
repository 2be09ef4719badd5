"""Fold-in: new and changed users solved from their ratings with the items frozen, checked against
NumPy in float64; the model it returns; the strong-generalisation protocol on a small case."""

import json

import numpy as np
import pandas as pd
import pytest

import jaxcf
from jaxcf import config, data
from jaxcf.cli import recommend, train
from jaxcf.core import foldin
from jaxcf.core.errors import ModelError
from jaxcf.serving.foldin import make_solver
from jaxcf.training import strong


def _csv(path, users=40, items=25, seed=0, density=0.6):
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(users, 2)), rng.normal(size=(items, 2))
    rows = [(a, b) for a in range(users) for b in range(items) if rng.random() < density]
    ratings = [float(np.clip(np.round(3 + 0.8 * u[a] @ v[b] + 0.3 * rng.normal()), 1, 5)) for a, b in rows]
    lines = ["userId,movieId,rating"] + [f"{a + 1},{b + 101},{r}" for (a, b), r in zip(rows, ratings)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _csv(tmp_path_factory.mktemp("data") / "r.csv")


def _model(tmp_path, small, kind, *extra):
    workdir = tmp_path / kind
    argv = ["--config", f"{kind}.yaml", "--workdir", str(workdir), "--quiet", "--set", f"data.path={small}",
            "model.n_factors=4", "train.epochs=20", "train.batch_size=32", "optim.learning_rate=1e-2", *extra]
    assert train.main(argv) == 0
    return jaxcf.load_model(workdir)


HISTORY = pd.DataFrame({"userId": [900, 900, 900, 900, 901, 901], "movieId": [101, 102, 103, 999, 104, 105],
                        "rating": [5.0, 4.0, 1.0, 3.0, 2.0, 4.5]})


def test_dot_fold_in_is_the_posterior_mean_of_bayesian_ridge(tmp_path, small):
    model = _model(tmp_path, small, "dot")
    folded = model.fold_in(HISTORY)
    solver = make_solver(model.export.weights, model.metadata, model.user_counts)
    # NumPy, float64: prior fitted to the users with ratings, alpha from the validation MSE.
    users = model.export.weights["user_embedding"].astype(np.float64)[model.user_counts > 0]
    mean, cov = users.mean(0), np.cov(users.T)
    cov += foldin.COVARIANCE_FLOOR * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = solver.prior_scale * np.linalg.inv(cov)
    alpha = 1 / model.history[-1]["valid_mse"]
    items = model.export.weights["item_embedding"].astype(np.float64)
    for user, rows in HISTORY[HISTORY.movieId != 999].groupby("userId"):
        v = items[model.lookup_items(rows.movieId.tolist())[0]]
        expected = np.linalg.solve(alpha * v.T @ v + precision, alpha * v.T @ rows.rating.to_numpy() + precision @ mean)
        got = folded.export.weights["user_embedding"][folded.lookup_users(user)[0][0]]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=f"user {user}")


def test_bias_fold_in_reaches_the_optimum_of_its_objective(tmp_path, small):
    model = _model(tmp_path, small, "bias")
    folded = model.fold_in(HISTORY)
    solver = make_solver(model.export.weights, model.metadata, model.user_counts)
    low, high = model.y_range
    w = model.export.weights
    for user, rows in HISTORY[HISTORY.movieId != 999].groupby("userId"):
        index = folded.lookup_users(user)[0][0]
        x = np.concatenate([folded.export.weights["user_embedding"][index], folded.export.weights["user_bias"][index]])
        x = x.astype(np.float64)
        items = model.lookup_items(rows.movieId.tolist())[0]
        features = np.concatenate([w["item_embedding"][items], np.ones((len(items), 1))], axis=1).astype(np.float64)
        mean, precision = solver.prior.mean[0].astype(np.float64), solver.prior.precision[0].astype(np.float64)
        alpha = float(solver.prior.alpha[0])

        def objective(x, features=features, items=items, rows=rows, alpha=alpha, mean=mean, precision=precision):
            z = features @ x + w["item_bias"][items, 0]
            err = rows.rating.to_numpy() - (low + (high - low) / (1 + np.exp(-z)))
            return alpha * np.sum(err**2) + (x - mean) @ precision @ (x - mean)

        # The gradient at the solution, by central differences in float64: zero up to float32 rounding.
        step = 1e-4
        grad = np.array([(objective(x + step * e) - objective(x - step * e)) / (2 * step) for e in np.eye(len(x))])
        scale = np.abs(precision @ (x - mean)).max() + 1.0
        assert np.abs(grad).max() < 2e-3 * scale, (user, grad)
        assert objective(x) < objective(mean)


def test_fold_in_leaves_the_model_alone_and_reports_unknown_items(tmp_path, small):
    model = _model(tmp_path, small, "bias")
    before = {k: v.copy() for k, v in model.export.weights.items()}
    folded = model.fold_in(HISTORY)
    for name, table in before.items():
        np.testing.assert_array_equal(model.export.weights[name], table)
    assert model.num_users == 40 and folded.num_users == 42
    report = folded.fold_in_report
    assert report.users_added == 2 and report.users_updated == 0
    assert report.unknown_items == [999] and report.unknown_item_ratings == 1
    assert not folded.predict(900, 101).fallback[0] and model.predict(900, 101).fallback[0]
    assert folded.predict(900, 999).fallback[0]  # an item new to the model stays a flagged fallback
    # Known users keep their rows unless they are folded in again.
    np.testing.assert_array_equal(folded.export.weights["user_embedding"][:40], before["user_embedding"])


def test_a_known_user_is_solved_from_training_and_new_ratings(tmp_path, small):
    model = _model(tmp_path, small, "dot")
    user = model.user_ids.raw[0]
    unseen = [i for i in model.item_ids.raw.tolist() if i not in model.item_ids.raw[model.seen(0)].tolist()]
    new = pd.DataFrame({"userId": [user], "movieId": [unseen[0]], "rating": [5.0]})
    folded = model.fold_in(new)
    report = folded.fold_in_report
    assert report.users_added == 0 and report.users_updated == 1
    assert report.ratings_used == len(model.seen(0)) + 1  # its training ratings and the new one
    assert len(folded.seen(0)) == len(model.seen(0)) + 1
    changed = folded.export.weights["user_embedding"][0]
    assert not np.array_equal(changed, model.export.weights["user_embedding"][0])


def test_a_folded_model_saves_and_loads_with_its_new_users(tmp_path, small):
    folded = _model(tmp_path, small, "bias").fold_in(HISTORY)
    saved = folded.save(tmp_path / "folded")
    again = jaxcf.load_model(saved)
    assert again.num_users == 42 and again.metadata["model"]["fold_ins"][0]["users_added"] == 2
    np.testing.assert_array_equal(again.predict([900, 901], [101, 104]).ratings,
                                  folded.predict([900, 901], [101, 104]).ratings)


def test_ensembles_and_gibbs_exports_fold_in_per_member(tmp_path, small):
    for kind, extra in (("bias", ["ensemble.size=3"]),
                        ("dot", ["ensemble.method=gibbs", "ensemble.size=4", "ensemble.chains=2",
                                 "ensemble.burn_in=4", "train.epochs=8"])):
        model = _model(tmp_path, small, kind, *extra)
        folded = model.fold_in(HISTORY)
        users = folded.export.weights["user_embedding"]
        assert users.ndim == 3 and users.shape[1] == 42
        if extra[0] == "ensemble.method=gibbs":
            np.testing.assert_array_equal(users[:, 40:, -1], 1.0)  # the folded-in mean column stays 1
        assert not folded.predict([900], [101]).fallback[0]


def test_recommend_from_ratings_matches_a_fold_in(tmp_path, small):
    model = _model(tmp_path, small, "bias")
    ranking, unknown = model.recommend_from_ratings([101, 102, 103, 999], [5, 4, 1, 3], k=5)
    folded = model.fold_in(HISTORY[HISTORY.userId == 900])
    expected = folded.recommend(900, k=5)
    assert unknown == [999] and ranking.ids.tolist() == expected.ids.tolist()
    np.testing.assert_allclose(ranking.scores, expected.scores, rtol=0, atol=1e-5)
    assert not {101, 102, 103} & set(ranking.ids.tolist())


def test_bad_ratings_are_one_line_errors(tmp_path, small):
    model = _model(tmp_path, small, "dot")
    with pytest.raises(ModelError, match="missing column"):
        model.fold_in(pd.DataFrame({"user": [1], "item": [2], "rating": [3.0]}))
    with pytest.raises(ModelError, match="not numeric"):
        model.fold_in(pd.DataFrame({"userId": [1], "movieId": [101], "rating": ["five"]}))
    with pytest.raises(ModelError, match="cannot be an id here"):
        model.fold_in(pd.DataFrame({"userId": ["abc"], "movieId": [101], "rating": [3.0]}))
    with pytest.raises(ModelError, match="no such ratings file"):
        model.fold_in(tmp_path / "nowhere.csv")


def test_a_ratings_file_is_read_with_a_bound(tmp_path, small, monkeypatch):
    """A FIFO (which would block a plain read) and a file past the size bound: one line each, no read."""
    import os

    from jaxcf.serving import foldin as foldin_export

    model = _model(tmp_path, small, "dot")
    fifo = tmp_path / "ratings.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ModelError, match="not a regular file"):
        model.fold_in(fifo)
    big = tmp_path / "big.csv"
    HISTORY.to_csv(big, index=False)
    monkeypatch.setattr(foldin_export, "MAX_RATINGS_BYTES", 16)
    with pytest.raises(ModelError, match="more than the 16 allowed"):
        model.fold_in(big)


def test_recommend_cli_folds_in_a_ratings_file(tmp_path, small, capsys):
    _model(tmp_path, small, "bias")
    history = tmp_path / "history.csv"
    HISTORY.to_csv(history, index=False)
    argv = ["--model", str(tmp_path / "bias"), "--ratings", str(history), "--user", "900", "--k", "3",
            "--save", str(tmp_path / "saved")]
    # A file that also holds another user's ratings is refused: --ratings is the one user's history.
    assert recommend.main(argv) == 2
    assert "names user(s) 901, not --user 900" in capsys.readouterr().err
    assert not (tmp_path / "saved").exists()
    HISTORY[HISTORY.userId == 900].to_csv(history, index=False)
    assert recommend.main(argv) == 0
    out = capsys.readouterr().out
    assert "folded in user 900 (new)" in out and "999" in out and "top 3 for user 900" in out
    assert json.loads((tmp_path / "saved" / "metadata.json").read_text())["model"]["num_users"] == 41


def test_strong_generalisation_on_a_small_case():
    """The done-when of fold-in, on ml-100k (CI-sized): within 0.02 of joint retraining, at least 0.02
    better than the fallback, and no held-out user left unknown."""
    cfg = config.load("bias.yaml", ["data.name=ml-100k"])
    result = strong.run(cfg, data.load(cfg.data, cfg.seed))
    assert result["unknown_after_fold_in"] == 0 and result["held_users"] == 94
    fold, joint, fallback = (result[k]["rmse"] for k in ("fold_in", "joint", "fallback"))
    assert fold <= joint + 0.02, (fold, joint)
    assert fold <= fallback - 0.02, (fold, fallback)
    # Only targets of items new to the base model (rated by held-out users alone) stay fallbacks.
    assert result["fold_in"]["fallback_share"] < 0.01 and result["fallback"]["fallback_share"] == 1.0
