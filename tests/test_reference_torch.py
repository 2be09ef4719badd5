"""Unit tests of the PyTorch port of the notebook (``reference_torch``) on small synthetic data.

What does not live here: comparisons with jaxcf (``tests/test_parity.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import safetensors.numpy
import torch
import torch.nn as nn

from reference_torch import notebook as nb
from reference_torch import train as cli
from reference_torch import weights as W


def small_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """Raw ids that are neither contiguous nor sorted, ratings on the half-star grid."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "userId": rng.choice([7, 3, 1000, 42, 5], size=n),
        "movieId": rng.choice([31, 1029, 9, 163949, 2, 77, 5], size=n),
        "rating": rng.integers(1, 11, size=n) / 2.0,
    })


@pytest.fixture
def ratings_csv(tmp_path):
    path = tmp_path / "ratings.csv"
    small_frame().assign(timestamp=1).to_csv(path, index=False)
    return path


def test_map_ids_follows_first_appearance():
    df = pd.DataFrame({"userId": [9, 4, 9, 1], "movieId": ["b", "a", "a", "c"], "rating": [1.0, 2.0, 3.0, 4.0]})
    mapped, users, movies = nb.map_ids(df)
    assert users.tolist() == [9, 4, 1] and movies.tolist() == ["b", "a", "c"]
    assert mapped["userId"].tolist() == [0, 1, 0, 2]
    assert mapped["movieId"].tolist() == [0, 1, 1, 2]
    assert df["userId"].tolist() == [9, 4, 9, 1], "map_ids must not modify its argument"


def test_map_ids_matches_the_notebooks_dicts():
    df = small_frame()
    mapped, users, movies = nb.map_ids(df)
    user2idx = {k: i for i, k in enumerate(df["userId"].unique())}
    movie2idx = {k: i for i, k in enumerate(df["movieId"].unique())}
    assert mapped["userId"].tolist() == df["userId"].apply(lambda x: user2idx[x]).tolist()
    assert mapped["movieId"].tolist() == df["movieId"].apply(lambda x: movie2idx[x]).tolist()


def test_split_mask_is_the_seeded_notebook_split():
    mask = nb.split_mask(1000, seed=42)
    assert mask.dtype == bool and mask.sum() == 200
    expected = np.zeros(1000, bool)
    expected[np.random.RandomState(42).permutation(1000)[:200]] = True
    np.testing.assert_array_equal(mask, expected)
    assert not np.array_equal(mask, nb.split_mask(1000, seed=43))
    with pytest.raises(nb.ReferenceDataError, match="too few"):
        nb.split_mask(3)


def test_explicit_order_gives_those_batches_including_the_last_partial_one():
    df, _, _ = nb.map_ids(small_frame(n=250))
    mask = nb.split_mask(len(df))  # 200 training rows: 3 batches of 64 and one of 8
    orders = nb.seeded_orders(200, seed=3)
    train_dl, valid_dl = nb.make_dataloaders(df, mask, 64, orders=orders, num_workers=0)
    train = df[~mask].values
    for epoch in range(2):
        batches = list(train_dl)
        assert [len(b) for b in batches] == [64, 64, 64, 8]
        np.testing.assert_array_equal(torch.cat(batches).numpy(), train[orders(epoch)])
    assert not np.array_equal(orders(0), orders(1)), "each epoch must get its own order"
    valid = torch.cat(list(valid_dl)).numpy()
    np.testing.assert_array_equal(valid, df[mask].values)  # in file order


def test_order_of_the_wrong_length_is_refused():
    df, _, _ = nb.map_ids(small_frame(n=50))
    train_dl, _ = nb.make_dataloaders(df, nb.split_mask(50), 8, orders=lambda epoch: np.arange(3), num_workers=0)
    with pytest.raises(ValueError, match="expected"):
        next(iter(train_dl))


def test_initialisers_follow_the_notebook_and_the_generator():
    dot = nb.EmbeddingDotProd(30, 40, 5, generator=torch.Generator().manual_seed(1))
    for table in (dot.users.weight, dot.movies.weight):
        assert 0 <= table.min() and table.max() < 0.05
    again = nb.EmbeddingDotProd(30, 40, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dot.users.weight, again.users.weight) and torch.equal(dot.movies.weight, again.movies.weight)
    bias = nb.EmbeddingDotProdBias(30, 40, 5, min_rating=0.5, max_rating=5.0, generator=torch.Generator())
    for table in (bias.users, bias.movies, bias.users_b, bias.movies_b):
        assert -0.01 <= table.weight.min() and table.weight.max() < 0.01
    assert bias.users_b.weight.shape == (30, 1) and bias.movies_b.weight.shape == (40, 1)


def test_forward_shapes_and_range():
    model = nb.EmbeddingDotProdBias(3, 4, 2, min_rating=1.0, max_rating=5.0)
    with torch.no_grad():
        model.users.weight.mul_(1000)  # push the sigmoid into saturation on both sides
    data = torch.tensor([[0, 1], [2, 3], [1, 0]])
    out = model(data)
    assert out.shape == (3,) and out.min() >= 1.0 and out.max() <= 5.0
    assert model(data[:1]).shape == (1,)
    dot = nb.EmbeddingDotProd(3, 4, 2)
    expected = (dot.users.weight[data[:, 0]] * dot.movies.weight[data[:, 1]]).sum(1)
    torch.testing.assert_close(dot(data), expected, rtol=0, atol=0)


class RecordingMSE(nn.MSELoss):
    def __init__(self):
        super().__init__()
        self.values = []

    def forward(self, pred, targ):
        loss = super().forward(pred, targ)
        if torch.is_grad_enabled():
            self.values.append(loss.item())
        return loss


def test_fit_reports_the_debiased_moving_average_and_uses_its_optimizer(capsys):
    df, users, movies = nb.map_ids(small_frame(n=250))
    mask = nb.split_mask(len(df))
    train_dl, valid_dl = nb.make_dataloaders(df, mask, 64, orders=nb.seeded_orders(200, 0), num_workers=0)
    model = nb.EmbeddingDotProdBias(len(users), len(movies), 4, min_rating=0.5, max_rating=5.0)
    before = model.users.weight.detach().clone()
    criterion = RecordingMSE()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    history = nb.fit(model, train_dl, 3, opt, criterion, valid_dl)
    assert not torch.equal(before, model.users.weight), "fit must step the optimizer it is given"

    assert len(criterion.values) == 3 * 4
    avg, batch_num = 0.0, 0
    for epoch in range(3):
        for loss in criterion.values[epoch * 4 : (epoch + 1) * 4]:
            batch_num += 1
            avg = avg * 0.98 + loss * 0.02
        assert history[epoch]["train_loss"] == pytest.approx(avg / (1 - 0.98**batch_num), rel=1e-12)
    assert history[-1]["val_loss"] == pytest.approx(nb.validate(model, valid_dl, nn.MSELoss())[0], rel=1e-12)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and printed[0].startswith("[0.")


def test_validate_is_the_mean_of_batch_losses():
    df, users, movies = nb.map_ids(small_frame(n=1000))
    mask = nb.split_mask(len(df))  # 200 validation rows: batches of 128 and 72
    _, valid_dl = nb.make_dataloaders(df, mask, 64, num_workers=0)
    model = nb.EmbeddingDotProd(len(users), len(movies), 3)
    pred = nb.predict(model, valid_dl).astype(np.float64)
    err = (pred - df[mask]["rating"].to_numpy()) ** 2
    expected = (err[:128].mean() + err[128:].mean()) / 2
    assert nb.validate(model, valid_dl, nn.MSELoss())[0] == pytest.approx(expected, rel=1e-6)


def test_weights_round_trip_through_safetensors(tmp_path):
    model = nb.EmbeddingDotProdBias(5, 6, 3, min_rating=0.5, max_rating=5.0, generator=torch.Generator())
    path = W.save_jaxcf_weights(model, tmp_path / "w" / "weights.safetensors")
    stored = safetensors.numpy.load_file(str(path))
    assert {k: v.shape for k, v in stored.items()} == {
        "user_embedding": (5, 3), "item_embedding": (6, 3), "user_bias": (5, 1), "item_bias": (6, 1),
    }
    other = nb.EmbeddingDotProdBias(5, 6, 3, min_rating=0.5, max_rating=5.0)
    W.load_jaxcf_weights(other, path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name
    assert [p.name for p in path.parent.iterdir()] == ["weights.safetensors"], "no temp file may be left behind"


def test_weights_that_do_not_fit_are_refused(tmp_path):
    bias = nb.EmbeddingDotProdBias(5, 6, 3, min_rating=0.5, max_rating=5.0)
    dot = nb.EmbeddingDotProd(5, 6, 3)
    path = W.save_jaxcf_weights(bias, tmp_path / "bias.safetensors")
    with pytest.raises(W.WeightsError, match="has item_bias, user_bias which EmbeddingDotProd does not"):
        W.load_jaxcf_weights(dot, path)
    shape_message = r"user_embedding has shape \[5, 3\] but EmbeddingDotProdBias expects \[5, 4\]"
    with pytest.raises(W.WeightsError, match=shape_message):
        W.load_jaxcf_weights(nb.EmbeddingDotProdBias(5, 6, 4, min_rating=0.5, max_rating=5.0), path)
    with pytest.raises(W.WeightsError, match="lacks item_bias, user_bias"):
        W.load_jaxcf_arrays(bias, W.to_jaxcf_arrays(dot))
    with pytest.raises(W.WeightsError, match="no such weights file"):
        W.load_jaxcf_weights(dot, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(W.WeightsError, match="not a readable safetensors file"):
        W.load_jaxcf_weights(dot, tmp_path / "junk.safetensors")


def test_cli_runs_the_notebook_and_round_trips_weights(ratings_csv, tmp_path, capsys):
    saved = tmp_path / "weights.safetensors"
    args = ["--data", str(ratings_csv), "--num-workers", "0", "--n-factors", "4", "--epochs", "2"]
    assert cli.main([*args, "--model", "bias", "--save-weights", str(saved)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("[")]
    assert len(rows) == 3 and rows[1].startswith("[0.") and rows[2].startswith("[1.")
    last_val = float(rows[2].strip("[]").split()[2])
    reported = float(out.split("val RMSE ")[1].split()[0])
    assert reported == pytest.approx(math.sqrt(last_val), abs=2e-6)
    assert saved.is_file()

    # --epochs 0 with the saved weights reproduces the last validation figure.
    assert cli.main([*args, "--model", "bias", "--epochs", "0", "--load-weights", str(saved), "--quiet"]) == 0
    again = float(capsys.readouterr().out.split("val RMSE ")[1].split()[0])
    assert again == pytest.approx(reported, abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/nonexistent/ratings.csv"], "no such ratings file"),
        (["--rating-col", "stars"], "missing column(s) stars"),
        (["--model", "dot", "--load-weights", "WEIGHTS"], "has item_bias, user_bias"),
        (["--device", "warp-drive"], "not a device name"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(ratings_csv, tmp_path, capsys, extra, message):
    weights = W.save_jaxcf_weights(
        nb.EmbeddingDotProdBias(5, 7, 4, min_rating=0.5, max_rating=5.0), tmp_path / "w.safetensors"
    )
    extra = [str(weights) if e == "WEIGHTS" else e for e in extra]
    code = cli.main(["--data", str(ratings_csv), "--num-workers", "0", "--n-factors", "4", "--epochs", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
