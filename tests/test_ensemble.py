"""Ensembles as a model: training through the train CLI, the stacked export and reading it back,
Gibbs-sampled BPMF members, and early stopping on the ensemble's validation RMSE."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.cli import train
from jaxcf.core import models, scoring
from jaxcf.families.bpmf import fit as gibbs
from jaxcf.serving import catalogue, export


def write_low_rank_csv(path, num_users=50, num_items=30, seed=0):
    """A small rank-2 ratings table in [1, 5] with noise (as in test_sweep.py)."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=(num_users, 2)), rng.normal(size=(num_items, 2))
    users, items = np.nonzero(rng.random((num_users, num_items)) < 0.5)
    ratings = np.clip(3.2 + 0.6 * np.sum(u[users] * v[items], 1) + 0.3 * rng.normal(size=len(users)), 1, 5)
    lines = ["userId,movieId,rating"] + [f"{a + 1},{b + 101},{r:.3f}" for a, b, r in zip(users, items, ratings)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    return write_low_rank_csv(tmp_path_factory.mktemp("data") / "ratings.csv")


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _train(workdir, config, *overrides, resume=False):
    argv = ["--config", config, "--workdir", str(workdir), "--quiet", "--set", *overrides]
    return train.main(argv + (["--resume"] if resume else []))


@pytest.fixture(scope="module")
def seeds_run(small_csv, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "seeds"
    code = _train(workdir, "bias.yaml", f"data.path={small_csv}", "ensemble.size=3", "train.epochs=3",
                  "train.batch_size=32", "model.n_factors=3", "optim.learning_rate=1e-2")
    assert code == 0
    return workdir


def test_seeds_ensemble_exports_stacked_members_and_reports_their_mean(seeds_run, small_csv):
    loaded = export.read(seeds_run)
    info = loaded.metadata["model"]
    assert info["ensemble_size"] == 3 and info["ensemble_method"] == "seeds" and info["kind"] == "bias"
    assert loaded.weights["user_embedding"].shape == (3, len(loaded.user_ids), 3)
    assert loaded.weights["item_bias"].shape == (3, len(loaded.item_ids), 1)
    # Members differ (different seeds), so the ensemble is not one model three times.
    assert not np.allclose(loaded.weights["item_embedding"][0], loaded.weights["item_embedding"][1])

    records = _metrics(seeds_run)
    final = records[-1]
    # The last epoch's record, completed: still one record per epoch.
    assert len(records) == 3 and final["final"] is True and final["members"] == 3 and final["epoch"] == 3
    assert "train_loss" in final and len(final["member_valid_rmse"]) == 3
    for key in ("valid_rmse", "valid_mae", "precision@10", "recall@10", "ndcg@10"):
        assert math.isfinite(final[key]), key
    # The reported RMSE is that of the model on disk: the mean of the members' scaled sigmoids,
    # recomputed here member by member in NumPy.
    from jaxcf.config import load
    from jaxcf.data import load as load_dataset

    config = load(seeds_run / "config.yaml")
    dataset = load_dataset(config.data, config.seed)
    valid = dataset.split.valid
    users, items = dataset.ratings.users[valid], dataset.ratings.items[valid]
    low, high = info["y_range"]
    w = loaded.weights
    logits = (np.sum(w["user_embedding"][:, users] * w["item_embedding"][:, items], axis=2)
              + w["user_bias"][:, users, 0] + w["item_bias"][:, items, 0])
    mean = np.mean(1 / (1 + np.exp(-logits.astype(np.float64))) * (high - low) + low, axis=0)
    rmse = math.sqrt(np.mean((mean - dataset.ratings.ratings[valid]) ** 2))
    assert final["valid_rmse"] == pytest.approx(rmse, rel=1e-5)


def test_an_ensemble_size_that_does_not_fit_the_tables_is_refused(seeds_run, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(seeds_run / "model", copy)
    metadata = json.loads((copy / "metadata.json").read_text())
    metadata["model"]["ensemble_size"] = 4
    (copy / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(export.ModelError, match="ensemble_size 4 but the weights' header says 3"):
        export.read(copy)


def test_early_stopping_exports_the_ensembles_best_epoch(small_csv, tmp_path):
    workdir = tmp_path / "run"
    # A high learning rate overfits 700 ratings within a few epochs, so the validation RMSE turns up.
    assert _train(workdir, "bias.yaml", f"data.path={small_csv}", "ensemble.size=2", "train.epochs=40",
                  "train.batch_size=32", "model.n_factors=8", "optim.learning_rate=0.05", "optim.weight_decay=0",
                  "train.early_stopping_patience=2") == 0
    records = _metrics(workdir)
    epochs, final = records[:-1], records[-1]
    best = min(epochs, key=lambda r: r["valid_rmse"])
    assert len(epochs) < 40 and len(epochs) == best["epoch"] + 2
    assert final["epoch"] == best["epoch"]
    assert final["valid_rmse"] == pytest.approx(best["valid_rmse"], rel=1e-5)
    assert export.read(workdir).metadata["model"]["epoch"] == best["epoch"]


def test_gibbs_ensemble_learns_a_low_rank_table(small_csv, tmp_path):
    workdir = tmp_path / "gibbs"
    assert _train(workdir, "dot.yaml", f"data.path={small_csv}", "ensemble.method=gibbs", "ensemble.size=4",
                  "ensemble.chains=2", "ensemble.burn_in=10", "train.epochs=30", "model.n_factors=3") == 0
    final = _metrics(workdir)[-1]
    # The ratings' standard deviation is about 0.8 (a constant prediction's RMSE); rank 2 plus noise
    # of 0.3 is learnable: BPMF gets about 0.35 here, plain SGD MF about 0.41.
    assert final["valid_rmse"] < 0.45
    loaded = export.read(workdir)
    assert loaded.metadata["model"]["ensemble_size"] == 4 and loaded.metadata["model"]["kind"] == "bpmf"
    users, items = loaded.weights["user_embedding"], loaded.weights["item_embedding"]
    assert users.shape[::2] == (4, 4) and items.shape[::2] == (4, 4)  # F = 3 plus the folded-in mean
    np.testing.assert_array_equal(users[..., -1], 1.0)
    train_mean = float(np.mean(_train_ratings(workdir)))
    np.testing.assert_allclose(items[..., -1], train_mean, rtol=1e-6)


def _train_ratings(workdir):
    from jaxcf.config import load
    from jaxcf.data import load as load_dataset

    config = load(workdir / "config.yaml")
    dataset = load_dataset(config.data, config.seed)
    return dataset.ratings.ratings[dataset.split.train]


def test_gibbs_config_errors_are_one_line(small_csv, tmp_path, capsys):
    code = _train(tmp_path / "x", "bias.yaml", f"data.path={small_csv}", "ensemble.method=gibbs", "train.epochs=40")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "set model.kind: bpmf" in err and not (tmp_path / "x").exists()


def test_wishart_draws_have_the_right_mean():
    scale = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
    root = jnp.linalg.cholesky(scale)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda key: gibbs.wishart(key, root, 6.0))(keys)
    # E[W] = df * scale and Var(W_ij) = df * (s_ij^2 + s_ii s_jj): each mean entry within 4 standard
    # errors. (A Bartlett factor with one degree of freedom off moves a diagonal mean by s_ii, over 5 SEs.)
    s = np.asarray(scale, np.float64)
    standard_error = np.sqrt(6.0 * (s**2 + np.outer(np.diag(s), np.diag(s))) / len(keys))
    assert np.all(np.abs(np.asarray(draws.mean(axis=0)) - 6.0 * s) < 4 * standard_error)
    assert np.all(np.linalg.eigvalsh(np.asarray(draws)) > 0)


def test_kept_sweeps_are_evenly_spaced_and_end_with_the_last():
    assert gibbs.kept_sweeps(100, 20, 4) == [40, 60, 80, 100]
    assert gibbs.kept_sweeps(30, 10, 20) == list(range(11, 31))


def test_member_summary_cosine_is_the_mean_of_member_cosines():
    rng = np.random.default_rng(1)
    table = rng.normal(size=(3, 5, 4)).astype(np.float32)
    summary = catalogue.member_summary({"item_embedding": table})["item_embedding"]
    unit = summary / np.linalg.norm(summary, axis=1, keepdims=True)
    per_member = [
        (t[0] @ t[2]) / (np.linalg.norm(t[0]) * np.linalg.norm(t[2])) for t in table
    ]
    assert float(unit[0] @ unit[2]) == pytest.approx(float(np.mean(per_member)), rel=1e-5)


def test_score_pairs_of_one_member_is_the_model_itself():
    rng = np.random.default_rng(2)
    params = {"user_embedding": rng.normal(size=(4, 2)), "item_embedding": rng.normal(size=(3, 2))}
    stacked = {k: jnp.asarray(v[None], jnp.float32) for k, v in params.items()}
    users, items = jnp.array([0, 3, 2]), jnp.array([1, 1, 0])
    single = models.score_rows(models.gather_rows({k: jnp.asarray(v, jnp.float32) for k, v in params.items()},
                                                  users, items), None)
    np.testing.assert_allclose(np.asarray(models.score_pairs(stacked, users, items, None)), np.asarray(single),
                               rtol=1e-6)


def test_load_model_predicts_and_recommends_with_the_ensemble(seeds_run, capsys):
    from jaxcf.cli import recommend
    from jaxcf.serving.inference import load_model

    model = load_model(seeds_run)
    loaded = export.read(seeds_run)
    y_range = tuple(loaded.metadata["model"]["y_range"])
    assert model.ensemble_size == 3
    raw_users, raw_items = loaded.user_ids[[0, 1, 2, 2]], loaded.item_ids[[0, 3, 1, 2]]
    predictions = model.predict(raw_users, raw_items)
    users, _ = model.lookup_users(raw_users)
    items, _ = model.lookup_items(raw_items)
    np.testing.assert_allclose(predictions.ratings, scoring.predict_pairs(loaded.weights, users, items, y_range),
                               rtol=1e-6)
    # The top item is the unseen item with the highest mean prediction over the members.
    ranking = model.recommend(raw_users[0], k=3)
    unseen = np.setdiff1d(np.arange(len(loaded.item_ids)), model.seen(int(users[0])))
    scores = scoring.predict_pairs(loaded.weights, np.full(len(unseen), users[0]), unseen, y_range)
    assert ranking.ids[0] == loaded.item_ids[unseen[np.argmax(scores)]]
    np.testing.assert_allclose(ranking.scores[0], scores.max(), rtol=1e-5)
    assert recommend.main(["--model", str(seeds_run), "--user", str(raw_users[0]), "--k", "2"]) == 0
    assert "top 2 for user" in capsys.readouterr().out


def test_dense_and_chunked_normal_equations_agree(monkeypatch):
    rng = np.random.default_rng(3)
    # Repeated (row, other) pairs must count as often as they occur in both forms.
    own, other, targets = rng.integers(0, 7, 60), rng.integers(0, 5, 60), rng.normal(size=60)
    factors = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    dense = gibbs.make_side(own, other, targets, 7, 5)
    monkeypatch.setattr(gibbs, "DENSE_CELLS", 0)
    chunked = gibbs.make_side(own, other, targets, 7, 5)
    assert dense.counts is not None and chunked.counts is None and float(dense.counts.max()) > 1
    for a, b in zip(gibbs.normal_equations(factors, dense, 7), gibbs.normal_equations(factors, chunked, 7)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    expected = sum(np.outer(factors[j], factors[j]) for o, j in zip(own, other) if o == 2)
    np.testing.assert_allclose(np.asarray(gibbs.normal_equations(factors, chunked, 7)[0][2]), expected, rtol=1e-5)
