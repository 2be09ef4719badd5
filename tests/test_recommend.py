"""Loading exported models, predictions for raw ids, fallbacks, top-k, similar items and the CLIs.

Expected values are computed here straight from the exported files (safetensors + JSON), not
through the code under test.
"""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy

from jaxcf.cli import predict, recommend, similar
from jaxcf.cli.train import main as train_main
from jaxcf.core import metrics
from jaxcf.core.errors import ModelError, UnknownIdError
from jaxcf.serving import export, inference
from jaxcf.serving.inference import load_model


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A bias model trained for one epoch on the bundled ml-latest-small."""
    path = tmp_path_factory.mktemp("bias")
    assert train_main(["--config", "bias.yaml", "--workdir", str(path), "--quiet", "--set", "train.epochs=1"]) == 0
    return path


@pytest.fixture(scope="module")
def model(workdir):
    return load_model(workdir)


@pytest.fixture(scope="module")
def files(workdir):
    """The export read directly: weights, ids, training pairs, titles."""
    folder = workdir / "model"
    weights = safetensors.numpy.load_file(folder / "weights.safetensors")
    ids = json.loads((folder / "ids.json").read_text())
    seen = safetensors.numpy.load_file(folder / "seen.safetensors")
    titles = dict((k, v) for k, v in json.loads((folder / "items.json").read_text())["titles"])
    meta = json.loads((folder / "metadata.json").read_text())
    return {
        "weights": weights,
        "users": ids["users"],
        "items": ids["items"],
        "user_index": {u: i for i, u in enumerate(ids["users"])},
        "item_index": {m: i for i, m in enumerate(ids["items"])},
        "seen_users": seen["users"],
        "seen_items": seen["items"],
        "titles": titles,
        "y_range": meta["model"]["y_range"],
    }


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def direct_bias_prediction(files, user_rows, item_rows):
    w = files["weights"]
    low, high = files["y_range"]
    dot = np.sum(
        w["user_embedding"][user_rows].astype(np.float64) * w["item_embedding"][item_rows].astype(np.float64), axis=1
    )
    logits = dot + w["user_bias"][user_rows, 0] + w["item_bias"][item_rows, 0]
    return sigmoid(logits) * (high - low) + low


# ------------------------------------------------------------------------------ loading


def test_workdir_and_export_folder_load_the_same_model(workdir, model):
    other = load_model(workdir / "model")
    assert model.path == other.path == workdir / "model"
    assert model.kind == "bias" and model.y_range == (0.5, 5.0)
    assert (model.num_users, model.num_items) == (671, 9066)
    np.testing.assert_array_equal(model.item_embedding, other.item_embedding)


def _copy_export(workdir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(workdir / "model", target)
    return target


def test_one_flipped_byte_in_the_weights_is_rejected(workdir, tmp_path):
    folder = _copy_export(workdir, tmp_path)
    payload = bytearray((folder / "weights.safetensors").read_bytes())
    payload[len(payload) // 2] ^= 0x01
    (folder / "weights.safetensors").write_bytes(bytes(payload))
    with pytest.raises(ModelError, match=r"weights\.safetensors: sha256 .* does not match") as err:
        load_model(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["seen.safetensors", "ids.json", "items.json"])
def test_truncated_files_are_rejected(workdir, tmp_path, name):
    folder = _copy_export(workdir, tmp_path)
    payload = (folder / name).read_bytes()
    (folder / name).write_bytes(payload[: len(payload) - 10])
    with pytest.raises(ModelError, match=rf"{name}: \d+ bytes, expected \d+"):
        load_model(folder)


def test_missing_pieces_give_clear_errors(workdir, tmp_path):
    with pytest.raises(ModelError, match="no such directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="no metadata.json"):
        load_model(tmp_path)
    folder = _copy_export(workdir, tmp_path)
    (folder / "seen.safetensors").unlink()
    with pytest.raises(ModelError, match="seen.safetensors: missing"):
        load_model(folder)


def test_metadata_cannot_point_outside_the_export(workdir, tmp_path):
    folder = _copy_export(workdir, tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["files"]["../config.yaml"] = {"bytes": 10, "sha256": "0" * 64}
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="outside the export"):
        load_model(folder)


# ------------------------------------------------------------------------------ predict


def test_predictions_match_the_weights(model, files):
    rng = np.random.default_rng(0)
    # Trained ids only: an id with a row but no training rating is a fallback (the next tests).
    user_rows = rng.choice(np.unique(files["seen_users"]), 300)
    item_rows = rng.choice(np.unique(files["seen_items"]), 300)
    raw_users = [files["users"][i] for i in user_rows]
    # Numeric strings (as the CLI passes them) must match integer ids.
    raw_items = [str(files["items"][i]) for i in item_rows]
    result = model.predict(raw_users, raw_items)
    assert result.ratings.dtype == np.float32 and result.ratings.shape == (300,)
    assert not result.fallback.any()
    np.testing.assert_allclose(result.ratings, direct_bias_prediction(files, user_rows, item_rows), rtol=0, atol=2e-6)


def test_chunked_prediction_equals_one_chunk(model, monkeypatch):
    users = np.repeat([1, 2, 3, 4, 5], 11)
    items = np.tile([31, 1029, 1061, 1129, 1172, 1, 2, 3, 5, 6, 7], 5)
    whole = model.predict(users, items).ratings
    monkeypatch.setattr(metrics, "PREDICT_CHUNK", 7)
    chunked = model.predict(users, items).ratings
    # Every pair is scored, once, by the same formula; only the call size differs (7 against 256).
    # XLA's CPU backend vectorises the 50-term dot product differently for different call shapes, so
    # a sum can differ in its last bit (seen: 1 ulp, 2.4e-7 at 3.64): a tolerance of 4 ulp in float32.
    np.testing.assert_allclose(chunked, whole, rtol=4 * 2.0**-23, atol=0)


def mean_training_prediction(files, user=None, item=None):
    """The documented fallback, computed from the files: the mean prediction over the training
    pairs of the given user, of the given item, or of all of them."""
    users, items = files["seen_users"], files["seen_items"]
    keep = np.ones(len(users), bool)
    if user is not None:
        keep &= users == files["user_index"][user]
    if item is not None:
        keep &= items == files["item_index"][item]
    assert keep.any()
    return direct_bias_prediction(files, users[keep], items[keep]).mean()


def test_unknown_ids_fall_back_to_the_mean_prediction_of_the_known_side(model, files):
    result = model.predict([999_999, 1, 999_999, 1], [31, 888_888, 888_888, 31])
    expected = [
        mean_training_prediction(files, item=31),  # unknown user: item 31's training pairs
        mean_training_prediction(files, user=1),  # unknown item: user 1's training pairs
        mean_training_prediction(files),  # both unknown: all training pairs
        direct_bias_prediction(files, [files["user_index"][1]], [files["item_index"][31]])[0],
    ]
    np.testing.assert_allclose(result.ratings, expected, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(result.fallback, [True, True, True, False])
    np.testing.assert_array_equal(result.user_known, [False, True, False, True])
    np.testing.assert_array_equal(result.item_known, [True, False, False, True])


def test_an_item_with_a_row_but_no_training_rating_is_a_flagged_fallback(model, files):
    """An item of the validation part only has an untrained row: never scored from it, never recommended."""
    counts = np.bincount(files["seen_items"], minlength=len(files["items"]))
    validation_only = files["items"][int(np.argmax(counts == 0))]
    assert counts[files["item_index"][validation_only]] == 0
    result = model.predict([999_999, 15], [validation_only, validation_only])
    assert result.fallback.tolist() == [True, True] and result.item_known.tolist() == [False, False]
    assert result.ratings[0] == pytest.approx(mean_training_prediction(files), abs=2e-6)
    assert result.ratings[1] == pytest.approx(mean_training_prediction(files, user=15), abs=2e-6)
    with pytest.raises(UnknownIdError, match="has no training rating"):
        model.predict(15, validation_only, strict=True)
    untrained = {files["items"][i] for i in np.flatnonzero(counts == 0)}
    assert not untrained & set(model.recommend(15, k=500, exclude_seen=False).ids.tolist())
    assert not untrained & set(model.cold_start(k=500).ids.tolist())
    assert not untrained & set(model.similar_items(260, k=500, min_ratings=0).ids.tolist())
    with pytest.raises(UnknownIdError, match="has no training rating"):
        model.similar_items(validation_only)
    column = files["item_index"][validation_only]
    assert model.scores([15])[0, column] == pytest.approx(result.ratings[1], abs=2e-6)


def test_strict_raises_for_unknown_ids(model):
    with pytest.raises(UnknownIdError, match="unknown user id 999999"):
        model.predict(999_999, 31, strict=True)
    with pytest.raises(UnknownIdError, match=r"unknown item id abc \(and 1 more\)"):
        model.predict(1, ["abc", 31, "0"], strict=True)
    assert model.predict(1, 31, strict=True).fallback.tolist() == [False]


# ------------------------------------------------------------------------------ recommend


@pytest.mark.parametrize("user", [1, 15])
def test_recommendations_are_unseen_titled_and_the_true_top_10(model, files, user):
    ranking = model.recommend(user, k=10)
    assert not ranking.fallback and len(ranking.ids) == 10
    user_row = files["user_index"][user]
    seen = {files["items"][i] for i in files["seen_items"][files["seen_users"] == user_row]}
    assert len(seen) > 0 and not seen & set(ranking.ids.tolist())
    assert ranking.titles == [files["titles"][i] for i in ranking.ids.tolist()]
    assert all(ranking.titles)
    assert np.all(np.diff(ranking.scores) <= 0)
    # Scores are the model's predictions, and nothing unseen scores higher than the 10th.
    all_rows = np.arange(len(files["items"]))
    direct = direct_bias_prediction(files, np.full(len(all_rows), user_row), all_rows)
    picked = [files["item_index"][i] for i in ranking.ids.tolist()]
    np.testing.assert_allclose(ranking.scores, direct[picked], rtol=0, atol=2e-6)
    trained = np.bincount(files["seen_items"], minlength=len(all_rows)) > 0
    unseen = np.array([files["items"][i] not in seen for i in all_rows]) & trained
    assert direct[unseen].max() <= ranking.scores[0] + 2e-6
    assert np.sort(direct[unseen])[-10] == pytest.approx(ranking.scores[-1], abs=2e-6)
    if user == 15:
        # User 15 rated 1,000+ movies: without the exclusion, rated ones would be in the top 10.
        assert (~unseen)[np.argsort(-direct)[:10]].any()


def test_including_seen_items_ranks_everything(model, files):
    user_row = files["user_index"][15]
    all_rows = np.arange(len(files["items"]))
    direct = direct_bias_prediction(files, np.full(len(all_rows), user_row), all_rows)
    ranking = model.recommend(15, k=5, exclude_seen=False)
    trained = np.bincount(files["seen_items"], minlength=len(all_rows)) > 0
    np.testing.assert_allclose(ranking.scores, np.sort(direct[trained])[::-1][:5], rtol=0, atol=2e-6)


def test_batched_recommendations_equal_single_ones(model, monkeypatch):
    monkeypatch.setattr(inference, "USERS_PER_CALL", 2)
    users = [1, 2, "3", 999_999, 15]
    batched = model.recommend_many(users, k=7)
    for user, ranking in zip(users, batched):
        single = model.recommend(user, k=7)
        np.testing.assert_array_equal(ranking.ids, single.ids)
        np.testing.assert_allclose(ranking.scores, single.scores, rtol=0, atol=1e-6)
        assert ranking.fallback == single.fallback


def test_unknown_user_gets_the_flagged_cold_start(model, files):
    ranking = model.recommend(999_999, k=5)
    assert ranking.fallback
    item_bias = files["weights"]["item_bias"][:, 0]
    best = np.argsort(-item_bias, kind="stable")[:5]
    assert ranking.ids.tolist() == [files["items"][i] for i in best]
    expected = [mean_training_prediction(files, item=files["items"][i]) for i in best]
    np.testing.assert_allclose(ranking.scores, expected, rtol=0, atol=2e-6)
    # The scores are what predict() answers for an unknown user.
    np.testing.assert_array_equal(ranking.scores, model.predict(999_999, ranking.ids).ratings)
    with pytest.raises(UnknownIdError):
        model.recommend(999_999, strict=True)


def test_similar_items_exclude_the_item_and_are_sorted_cosines(model, files):
    ranking = model.similar_items(260, k=10)
    assert 260 not in ranking.ids.tolist() and len(ranking.ids) == 10
    assert np.all(np.diff(ranking.scores) <= 0)
    table = files["weights"]["item_embedding"].astype(np.float64)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    cosine = unit @ unit[files["item_index"][260]]
    picked = [files["item_index"][i] for i in ranking.ids.tolist()]
    np.testing.assert_allclose(ranking.scores, cosine[picked], rtol=0, atol=1e-5)
    # No rated item other than 260 is closer than the 10th answer.
    rated = np.bincount(files["seen_items"], minlength=len(files["items"])) >= 1
    rated[files["item_index"][260]] = False
    assert cosine[rated].max() == pytest.approx(ranking.scores[0], abs=1e-5)
    assert np.sort(cosine[rated])[-10] == pytest.approx(ranking.scores[-1], abs=1e-5)


def test_similar_items_respect_min_ratings_and_reject_unknown_items(model):
    ranking = model.similar_items(260, k=20, min_ratings=50)
    counts = model.item_counts[model.lookup_items(ranking.ids)[0]]
    assert counts.min() >= 50
    with pytest.raises(UnknownIdError, match="unknown item id 0"):
        model.similar_items(0)


def test_bias_rankings_and_embeddings(model, files):
    item_bias = files["weights"]["item_bias"][:, 0]
    top = model.bias_ranking("item", k=3)
    assert top.scores[0] == pytest.approx(item_bias.max())
    bottom = model.bias_ranking("item", k=3, lowest=True, min_ratings=20)
    counts = np.bincount(files["seen_items"], minlength=len(files["items"]))
    assert bottom.scores[0] == pytest.approx(item_bias[counts >= 20].min())
    users = model.bias_ranking("user", k=2)
    assert users.scores[0] == pytest.approx(files["weights"]["user_bias"].max())
    assert model.user_ids.raw.tolist() == files["users"]
    np.testing.assert_array_equal(model.item_embedding, files["weights"]["item_embedding"])


# ------------------------------------------------------------------------------ the dot model


def _dot_export(tmp_path):
    """A tiny hand-made dot-model export with string item ids."""
    rng = np.random.default_rng(3)
    params = {"user_embedding": rng.normal(size=(3, 4)), "item_embedding": rng.normal(size=(5, 4))}
    folder = export.write(
        tmp_path,
        params=params,
        user_ids=np.array([10, 20, 30]),
        item_ids=np.array(["a", "b", "c", "d", "e"], dtype=object),
        train_users=np.array([0, 0, 1, 2, 2, 2]),
        train_items=np.array([0, 1, 1, 1, 2, 3]),
        config={},
        model_info={"kind": "dot", "n_factors": 4, "y_range": None, "num_users": 3, "num_items": 5},
        data_info={"source": "hand-made"},
        metrics=[],
        titles={"a": "A (2001)", "b": "B (2002)"},
    )
    return folder, params


def test_dot_model_predictions_and_fallbacks(tmp_path):
    folder, params = _dot_export(tmp_path)
    model = load_model(folder)
    user, item = params["user_embedding"], params["item_embedding"]
    pairs = [(0, 0), (0, 1), (1, 1), (2, 1), (2, 2), (2, 3)]
    result = model.predict(["10", 99, 20, 99, 30], ["b", "b", "zz", "zz", "e"])
    expected = [
        user[0] @ item[1],
        np.mean([user[u] @ item[1] for u in (0, 1, 2)]),  # unknown user: b's raters
        np.mean([user[1] @ item[1]]),  # unknown item: user 20's pairs
        np.mean([user[u] @ item[i] for u, i in pairs]),  # both unknown
        np.mean([user[2] @ item[i] for i in (1, 2, 3)]),  # e has a row but no training rating: user 30's pairs
    ]
    np.testing.assert_allclose(result.ratings, expected, rtol=1e-5)
    assert result.fallback.tolist() == [False, True, True, True, True]
    with pytest.raises(ModelError, match="a model with biases"):
        model.bias_ranking()


def test_dot_model_cold_start_is_by_popularity_and_seen_items_are_excluded(tmp_path):
    folder, params = _dot_export(tmp_path)
    model = load_model(folder)
    # b has 3 training ratings, then a, c, d have 1 each (ties keep index order).
    cold = model.recommend(99, k=2)
    assert cold.fallback and cold.ids.tolist() == ["b", "a"] and cold.titles == ["B (2002)", "A (2001)"]
    np.testing.assert_array_equal(cold.scores, model.predict(99, ["b", "a"]).ratings)
    # User 30 rated b, c, d: only a remains (e was never trained: it is never recommended).
    assert model.recommend(30, k=10).ids.tolist() == ["a"]


# ------------------------------------------------------------------------------ CLIs


def test_predict_cli(workdir, files, capsys):
    assert predict.main(["--model", str(workdir), "--user", "1", "--item", "31"]) == 0
    out = capsys.readouterr().out
    expected = direct_bias_prediction(files, [files["user_index"][1]], [files["item_index"][31]])[0]
    assert f"predicted rating {expected:.4f}" in out and "Dangerous Minds (1995)" in out and "fallback" not in out
    assert predict.main(["--model", str(workdir), "--user", "999999", "--item", "31"]) == 0
    expected = mean_training_prediction(files, item=31)
    out = capsys.readouterr().out
    assert f"predicted rating {expected:.4f} (fallback: unknown user; mean prediction over the item's" in out


def test_recommend_cli_prints_ranked_titles(workdir, model, capsys):
    assert recommend.main(["--model", str(workdir), "--user", "1", "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = model.recommend(1, k=3)
    assert len(lines) == 2 + 3
    rows = zip(lines[2:], expected.ids.tolist(), expected.titles, expected.scores.tolist())
    for rank, (line, raw, title, score) in enumerate(rows, 1):
        assert line.split()[:3] == [str(rank), str(raw), f"{score:.4f}"] and line.endswith(title)


@pytest.mark.parametrize(
    "cli, args, message",
    [
        (predict, ["--user", "999999", "--item", "31", "--strict"], "unknown user id 999999"),
        (recommend, ["--user", "nobody", "--strict"], "unknown user id nobody"),
        (similar, ["--item", "0"], "unknown item id 0"),
        (recommend, ["--user", "1", "--k", "0"], "--k must be >= 1"),
    ],
)
def test_bad_ids_exit_2_with_one_line(cli, args, message, workdir, capsys):
    assert cli.main(["--model", str(workdir), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


@pytest.mark.parametrize("cli, args", [(predict, ["--user", "1", "--item", "1"]), (similar, ["--item", "1"])])
def test_missing_model_exits_2(cli, args, tmp_path, capsys):
    assert cli.main(["--model", str(tmp_path / "nope"), *args]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and err.count("\n") == 1


def test_known_terms_fallback_is_surprises_literal_rule(model):
    user_bias = model.user_bias
    item_bias = model.item_bias
    low, high = model.y_range
    user, item = model.user_ids.raw[3], model.item_ids.raw[5]
    result = model.predict([user, "no-such-user", "no-such-user"], [999_999_999, item, 999_999_999],
                           fallback="known_terms")
    sig = lambda x: 1 / (1 + np.exp(-x)) * (high - low) + low  # noqa: E731
    expected = [sig(user_bias[3]), sig(item_bias[5]), (low + high) / 2]
    np.testing.assert_allclose(result.ratings, expected, rtol=1e-6)
    assert result.fallback.all()
    with pytest.raises(ValueError, match="fallback="):
        model.predict([user], [item], fallback="zero")
