"""Many models in one program (jaxcf.families.sgd.members) and sweeps (jaxcf.training.sweep, jaxcf.cli.crossval):
members equal single runs, per-member hyper-parameters, row L2, schedules, the holdout split, the sweep and
cross-validation CLIs. Tiny synthetic data keeps every program small."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcf import config as cfg
from jaxcf import data
from jaxcf.cli import sweep
from jaxcf.core import optim, steps
from jaxcf.core.errors import TrainingDiverged
from jaxcf.data import load as load_dataset
from jaxcf.families.sgd import fit as sgd
from jaxcf.families.sgd import members
from jaxcf.training import loop as trainer


def write_low_rank_csv(path, num_users=50, num_items=30, seed=0):
    """A small rank-2 ratings table in [1, 5] with noise: learnable, so training visibly helps."""
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


def _config(csv, *overrides):
    return cfg.load("bias.yaml", [f"data.path={csv}", "train.batch_size=32", "model.n_factors=3", *overrides])


def fit_members(config, dataset, member_list, allow_diverged=False):
    """K members side by side through the one loop: (state, progress)."""
    family = members.family(sgd.make_setup(config, dataset), member_list, allow_diverged=allow_diverged)
    return trainer.train(family, config, family.init())


def fit_single(config, dataset):
    family = sgd.family(sgd.make_setup(config, dataset))
    return trainer.train(family, config, family.init())


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_the_injected_optimizer_steps_like_jaxcf_optim(name):
    config = cfg.load("bias.yaml", [f"optim.name={name}", "optim.learning_rate=0.01", "optim.weight_decay=0.1"])
    injected, reference = members.make_optimizer(config, steps_per_epoch=10), optim.transform(config.optim, 10)
    params = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[0.1], [0.3]])}
    grads = [jax.tree.map(lambda x, k=k: jnp.sin(x * (k + 1)), params) for k in range(5)]
    p1, s1, p2, s2 = params, injected.init(params), params, reference.init(params)
    for g in grads:
        u1, s1 = injected.update(g, s1, p1)
        u2, s2 = reference.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for key in params:
        # Injected hyper-parameters are float32 arrays where optax otherwise computes with Python
        # floats (e.g. 1 - b1**t): a few float32 ulps apart after 5 steps, not more.
        np.testing.assert_allclose(np.asarray(p1[key]), np.asarray(p2[key]), rtol=2e-5, err_msg=key)


def test_each_member_equals_its_own_single_model_run(small_csv):
    base = _config(small_csv, "train.epochs=2")
    other = dataclasses.replace(
        base, seed=7, optim=dataclasses.replace(base.optim, learning_rate=5e-3, weight_decay=1e-2, b1=0.8)
    )
    dataset = load_dataset(base.data, base.seed)
    fitted, fitted_progress = fit_members(base, dataset, [members.Member(base, {}), members.Member(other, {})])
    for k, config in enumerate((base, other)):
        state, progress = fit_single(config, dataset)
        for name, table in state.params.items():
            # vmap may order a reduction differently from the single program: float32 rounding only.
            np.testing.assert_allclose(
                np.asarray(fitted.params[name][k]), np.asarray(table), rtol=2e-5, atol=2e-6,
                err_msg=f"member {k} {name}",
            )
        assert fitted_progress.history[-1]["member_valid_rmse"][k] == pytest.approx(
            progress.history[-1]["valid_rmse"], rel=1e-5)


def test_row_l2_adds_the_gradient_of_a_per_rating_penalty():
    params = {
        "user_embedding": jnp.array([[0.3, -0.2], [0.1, 0.4]]),
        "item_embedding": jnp.array([[0.5, 0.1], [-0.3, 0.2], [0.2, 0.2]]),
        "user_bias": jnp.array([[0.1], [-0.2]]),
        "item_bias": jnp.array([[0.05], [0.0], [-0.1]]),
    }
    tx = optax.sgd(1.0)
    step = steps.make_step(tx, (0.5, 5.0), row_l2=True)
    state = steps.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))
    # User 0 appears twice, item 2 is padding (weight 0) and must not be penalised.
    users, items = jnp.array([0, 0, 1, 1]), jnp.array([0, 1, 1, 2])
    ratings, weights = jnp.array([4.0, 3.0, 5.0, 0.0]), jnp.array([1.0, 1.0, 1.0, 0.0])
    plain, loss_plain = step(state, 0.0, users, items, ratings, weights)
    penalised, loss_penalised = step(state, 0.1, users, items, ratings, weights)
    assert float(loss_plain) == float(loss_penalised)  # the reported loss is the MSE alone
    counts = {"user": np.array([2, 1]), "item": np.array([1, 2, 0])}
    for name, table in params.items():
        count = counts[name.split("_")[0]][:, None]
        # SGD with lr 1: the difference is -d/dp [0.1 * sum_b w_b |row_b|^2 / sum_b w_b] = -0.2 * count * p / 3.
        expected = -0.2 * count * np.asarray(table) / 3.0
        np.testing.assert_allclose(np.asarray(penalised.params[name] - plain.params[name]), expected,
                                   rtol=1e-5, atol=1e-7, err_msg=name)


def test_schedule_multipliers():
    total = 100
    constant = optim.schedule_multiplier("constant", total)
    cosine = optim.schedule_multiplier("cosine", total)
    onecycle = optim.schedule_multiplier("onecycle", total)
    assert float(constant(0)) == float(constant(total)) == 1.0
    assert float(cosine(0)) == 1.0 and float(cosine(total)) == pytest.approx(0.0, abs=1e-6)
    peak = max(float(onecycle(t)) for t in range(total + 1))
    assert peak == pytest.approx(1.0) and float(onecycle(0)) < 0.1 and float(onecycle(total)) < 1e-3


def test_members_of_one_program_must_share_the_static_part(small_csv):
    base = _config(small_csv)
    wider = dataclasses.replace(base, model=dataclasses.replace(base.model, n_factors=4))
    with pytest.raises(cfg.ConfigError, match="may differ only in seed"):
        fit_members(base, load_dataset(base.data, 42), [members.Member(base, {}), members.Member(wider, {})])


def test_holdout_split_takes_only_training_rows(bundled):
    inner = data.holdout(bundled, 0.1, 42)
    train_rows = set(bundled.split.train.tolist())
    assert set(inner.split.train.tolist()) | set(inner.split.valid.tolist()) == train_rows
    assert not set(inner.split.train.tolist()) & set(inner.split.valid.tolist())
    assert len(inner.split.valid) == int(len(bundled.split.train) * 0.1)
    assert inner.split.name == "random-holdout0.1"


def test_sweep_cli_trains_every_member_and_reports_the_best(small_csv, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    argv = ["--config", "bias.yaml", "--set", f"data.path={small_csv}", "train.epochs=2", "train.batch_size=32",
            "--grid", "optim.weight_decay=0,1e-2", "--grid", "model.n_factors=2,3", "--seeds", "2",
            "--out", str(out), "--quiet"]
    assert sweep.main(argv) == 0
    summary = json.loads(out.read_text())
    rows = summary["members"]
    assert len(rows) == 8 and len(summary["programs"]) == 2  # n_factors is static: one program each
    assert sorted(m["seed"] for m in rows) == [42, 42, 42, 42, 43, 43, 43, 43]
    assert {json.dumps(m["point"], sort_keys=True) for m in rows} == {
        json.dumps({"model.n_factors": n, "optim.weight_decay": w}, sort_keys=True) for n in (2, 3) for w in (0.0, 1e-2)
    }
    assert all(m["valid_rmse"] == m["valid_rmse_by_epoch"][-1] for m in rows)
    assert summary["best_member"]["valid_rmse"] == min(m["valid_rmse"] for m in rows)
    assert summary["ensemble_of_all"]["members"] == 8
    assert len(summary["by_point"]) == 4
    printed = capsys.readouterr().out
    assert "best member" in printed and "8 models in 2 compiled program(s)" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grid", "optim.weight_decay"], "--grid expects KEY=V1,V2"),
        (["--grid", "optim.wieght_decay=1,2"], "did you mean 'weight_decay'"),
        (["--grid", "seed=1,2"], "use --seeds"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--set", "optim.name=lazy_adam"], "adam or adamw"),
        (["--set", "model.kind=bpmf"], "model.kind bpmf is trained by python -m jaxcf.train"),
    ],
)
def test_sweep_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert sweep.main(["--config", "bias.yaml", "--out", str(tmp_path / "x.json"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()


def test_a_diverging_member_leaves_the_others_alone(small_csv):
    base = _config(small_csv, "model.kind=dot", "train.epochs=2", "optim.weight_decay=0")
    wild = dataclasses.replace(base, optim=dataclasses.replace(base.optim, learning_rate=1e30))
    dataset = load_dataset(base.data, base.seed)
    state, progress = fit_members(base, dataset, [members.Member(base, {}), members.Member(wild, {})],
                                  allow_diverged=True)
    assert progress.carry["diverged"] == [False, True]
    record = progress.history[-1]
    assert np.isfinite(record["member_valid_rmse"][0]) and np.isnan(record["member_valid_rmse"][1])
    assert record["members"] == 1 and record["valid_rmse"] == pytest.approx(record["member_valid_rmse"][0])
    assert jax.tree.leaves(state.params)  # the state is still returned whole


def test_a_diverging_member_of_an_ensemble_stops_the_run(small_csv):
    base = _config(small_csv, "model.kind=dot", "train.epochs=2", "optim.weight_decay=0")
    wild = dataclasses.replace(base, seed=43, optim=dataclasses.replace(base.optim, learning_rate=1e30))
    with pytest.raises(TrainingDiverged, match="seed 43"):
        fit_members(base, load_dataset(base.data, base.seed), [members.Member(base, {}), members.Member(wild, {})])


def test_a_sweep_out_that_is_a_folder_is_refused_before_training(small_csv, tmp_path, capsys):
    argv = ["--config", "bias.yaml", "--set", f"data.path={small_csv}", "train.epochs=1", "--out", str(tmp_path)]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "\n" not in err.strip()


def test_crossval_scores_each_official_fold_and_summarises(tmp_path, capsys):
    from jaxcf.cli import crossval

    out = tmp_path / "cv.json"
    argv = ["--config", "bias.yaml", "--splits", "u1,u2", "--workdir", str(tmp_path / "cv"), "--out", str(out),
            "--set", "data.name=ml-100k", "train.epochs=1", "train.batch_size=8192", "model.n_factors=2"]
    assert crossval.main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["splits"]
    # A fold's .test part is a test set: reported as test_rmse, nothing validated.
    assert [r["split"] for r in rows] == ["u1", "u2"] and all((r["num_valid"], r["num_test"]) == (0, 20000)
                                                            for r in rows)
    rmses = [r["metrics"]["test_rmse"] for r in rows]
    assert rmses[0] != rmses[1] and "valid_rmse" not in rows[0]["metrics"]
    assert result["summary"]["test_rmse"]["mean"] == pytest.approx(np.mean(rmses))
    assert result["summary"]["test_rmse"]["std"] == pytest.approx(np.std(rmses, ddof=1))
    # The figure is the exported model's, and equals what the training run logged for its last epoch.
    for row in rows:
        logged = json.loads((tmp_path / "cv" / row["split"] / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["metrics"]["test_rmse"] == pytest.approx(logged["test_rmse"], rel=1e-5)
    assert "test_rmse" in capsys.readouterr().out


def test_crossval_refuses_a_grid_without_validation_rows(tmp_path, capsys):
    from jaxcf.cli import crossval

    argv = ["--config", "bias.yaml", "--splits", "u1", "--workdir", str(tmp_path / "cv"), "--grid",
            "model.n_factors=2,4", "--set", "data.name=ml-100k"]
    assert crossval.main(argv) == 2
    assert "add --holdout 0.1" in capsys.readouterr().err


def test_crossval_refuses_a_split_the_dataset_does_not_have(tmp_path, capsys):
    from jaxcf.cli import crossval

    assert crossval.main(["--config", "bias.yaml", "--splits", "u9", "--workdir", str(tmp_path / "cv")]) == 2
    err = capsys.readouterr().err
    assert "ml-latest-small has no predefined splits" in err


def test_grid_values_in_exponent_notation_are_numbers():
    from jaxcf.core.configfile import parse_grid

    grid = parse_grid(["implicit.l2=1e-5,1.5E3,0.1", "optim.name=adamw,lazy_adam"])
    assert grid == {"implicit.l2": [1e-5, 1500.0, 0.1], "optim.name": ["adamw", "lazy_adam"]}
    assert all(isinstance(v, float) for v in grid["implicit.l2"])


def test_the_sweep_refuses_a_mesh(tmp_path, capsys):
    from jaxcf.cli import sweep

    assert sweep.main(["--config", "bias.yaml", "--seeds", "2", "--set", "mesh.model=2", "--out",
                       str(tmp_path / "s.json"), "--quiet"]) == 2
    assert "the sweep trains on one device" in capsys.readouterr().err and not (tmp_path / "s.json").exists()
