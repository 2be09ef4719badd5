"""A bounded fuzz pass (hypothesis) over the CSV loader and the config loader.

Any input must give either a valid dataset or config, or a clean one-line error
(``DataError``/``ConfigError``), never another exception. The budget is fixed by
``max_examples`` so CI time stays bounded; the runs are derandomized so a failure reproduces.
"""

import math
import string

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxcf import config as cfg
from jaxcf import data

FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

CELL = st.one_of(
    st.integers(-3, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(string.ascii_letters + string.digits + " .-_\"'", max_size=6),
    st.just(""),
    st.sampled_from(["nan", "inf", "-inf", "NULL", "1e309", "4.5", "0x10", "١"]),
)
HEADER = st.lists(
    st.sampled_from(["userId", "movieId", "rating", "timestamp", "x", ""]), min_size=0, max_size=5
)


@st.composite
def csv_bytes(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    header = draw(HEADER)
    delimiter = draw(st.sampled_from([",", ",", ",", ";", "\t"]))
    rows = draw(st.lists(st.lists(CELL, min_size=0, max_size=5), max_size=12))
    lines = [delimiter.join(header)] + [delimiter.join(row) for row in rows]
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    return ending.join(lines).encode("utf-8") + draw(st.sampled_from([b"", b"\n"]))


def _check_ratings(ratings: data.Ratings) -> None:
    n = len(ratings)
    assert n > 0
    assert ratings.users.shape == ratings.items.shape == ratings.ratings.shape == (n,)
    assert 0 <= ratings.users.min() and ratings.users.max() < ratings.num_users
    assert 0 <= ratings.items.min() and ratings.items.max() < ratings.num_items
    assert np.all(np.isfinite(ratings.ratings))
    # every raw id maps back to its index
    idx, known = ratings.user_ids.lookup(ratings.user_ids.raw)
    assert known.all() and np.array_equal(idx, np.arange(ratings.num_users))


@FUZZ
@given(payload=csv_bytes())
def test_csv_loader_gives_a_dataset_or_a_clean_error(payload, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "ratings.csv"
    path.write_bytes(payload)
    try:
        ratings = data.load_csv(path)
    except data.DataError as err:
        message = str(err)
        assert message and "\n" not in message
        return
    _check_ratings(ratings)
    try:
        split = data.random_split(len(ratings), 0.2, seed=0)
    except data.DataError as err:
        assert "too few ratings" in str(err)
        return
    assert len(split.train) + len(split.valid) == len(ratings)


YAML_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1e-3", "adam", "adamw", "dot", "bias", "mlp", "", "0x1F", "1_000", ".inf"]),
    st.lists(st.integers(-5, 10), max_size=3),
)
KEYS = {
    "": ["seed", "data", "model", "optim", "train", "checkpoint", "mesh", "extra"],
    "data": ["name", "path", "user_col", "item_col", "rating_col", "valid_fraction", "split", "rating_range", "nme"],
    "model": ["kind", "n_factors", "y_range", "factors"],
    "optim": ["name", "learning_rate", "weight_decay", "b1", "b2", "eps", "lr"],
    "train": ["epochs", "batch_size", "eval_batch_size", "early_stopping_patience", "epoch"],
    "checkpoint": ["every_epochs", "keep"],
    "mesh": ["data", "model"],
}


@st.composite
def config_trees(draw):
    tree = {}
    for key in draw(st.lists(st.sampled_from(KEYS[""]), max_size=5, unique=True)):
        if key in KEYS and draw(st.integers(0, 4)):
            tree[key] = {
                sub: draw(YAML_SCALAR) for sub in draw(st.lists(st.sampled_from(KEYS[key]), max_size=4, unique=True))
            }
        else:
            tree[key] = draw(YAML_SCALAR)
    return tree


@FUZZ
@given(tree=config_trees())
def test_config_loader_gives_a_config_or_a_clean_error(tree):
    try:
        config = cfg.from_dict(tree)
    except cfg.ConfigError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert config.optim.learning_rate > 0 and math.isfinite(config.optim.learning_rate)
    assert config.train.batch_size >= 1 and 0 <= config.data.valid_fraction < 1
    assert cfg.from_dict(cfg.to_dict(config)) == config


@FUZZ
@given(text=st.text(max_size=120))
def test_config_file_text_gives_a_config_or_a_clean_error(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzzcfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg.load(path)
    except cfg.ConfigError as err:
        assert str(err) and "\n" not in str(err)
