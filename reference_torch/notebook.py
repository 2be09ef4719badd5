"""The notebook, ported to current PyTorch: data steps, the two models, ``fit`` and ``validate``.

Read it beside ``shared/seed/notebook.txt``: the names, the order and the arithmetic are the
notebook's. Only what no longer runs, or was a bug, is changed, and each change carries a comment
that starts with ``Fix:``:

- ``Variable(...)`` wrappers are gone (tensors carry autograd since PyTorch 0.4).
- ``loss.data[0]`` is ``loss.item()`` (indexing a 0-d tensor fails since 0.5).
- ``tqdm_notebook`` is ``tqdm.auto.tqdm`` (works in and out of Jupyter).
- hard ``.cuda()`` calls move batches to the model's device instead, so it runs on CPU or CUDA.
- ``fit`` calls ``optim.zero_grad()`` on its argument, not the global ``opt``, and takes
  ``valid_dl`` as an argument instead of reading the global one.
- ``EmbeddingDotProdBias`` takes ``min_rating``/``max_rating`` as arguments instead of globals.
- the split is seeded: ``np.random.seed = 42`` rebinds the attribute and seeds nothing.
- the id maps are vectorised (``pd.Index.get_indexer``) instead of a per-row ``.apply``; same
  indices (order of first appearance).

Additions that leave the default behaviour alone: a ``generator`` for the initialisers and the
shuffle (explicit seeding instead of the global RNG), ``EpochOrderSampler`` to feed an explicit
batch order, and ``fit``'s ``on_epoch`` hook and returned history (the parity suite uses them).

What does not live here: the command line (``reference_torch.train``) and the safetensors
weight exchange with jaxcf (``reference_torch.weights``). Nothing here imports jaxcf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

# The bundled copy of the notebook's ml-latest-small (October 2016), read by path: no jaxcf import.
BUNDLED_RATINGS = (
    Path(__file__).resolve().parent.parent / "jaxcf" / "data" / "bundled" / "ml-latest-small-2016" / "ratings.csv.gz"
)


class ReferenceDataError(ValueError):
    """A ratings file the port cannot use; the message is one line meant for the user."""


# ------------------------------------------------------------------------------ Preprocessing


def load_ratings(
    path: str | Path = BUNDLED_RATINGS,
    user_col: str = "userId",
    item_col: str = "movieId",
    rating_col: str = "rating",
) -> pd.DataFrame:
    """``df = pd.read_csv(PATH + '/ratings.csv')``, with the columns renamed to the notebook's.

    Args:
      path: a ratings CSV, optionally compressed (``.gz``).
      user_col, item_col, rating_col: the file's column names.

    Returns:
      DataFrame with columns ``userId``, ``movieId``, ``rating`` (raw ids, float ratings), in file order.

    Raises:
      ReferenceDataError: missing or unreadable file, missing columns, non-numeric or missing values.
    """
    path = Path(path)
    if not path.is_file():
        raise ReferenceDataError(f"{path}: no such ratings file; pass --data PATH to a ratings CSV")
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReferenceDataError(f"{path}: cannot read as CSV ({first})") from None
    missing = [c for c in (user_col, item_col, rating_col) if c not in df.columns]
    if missing:
        raise ReferenceDataError(
            f"{path}: missing column(s) {', '.join(missing)}; the file has {', '.join(map(str, df.columns[:8]))}. "
            "Pass --user-col/--item-col/--rating-col"
        )
    df = df[[user_col, item_col, rating_col]].rename(
        columns={user_col: "userId", item_col: "movieId", rating_col: "rating"}
    )
    if len(df) == 0:
        raise ReferenceDataError(f"{path}: has a header but no ratings")
    if df[["userId", "movieId"]].isna().any().any():
        raise ReferenceDataError(f"{path}: some ratings lack a user or movie id; every rating needs both")
    ratings = pd.to_numeric(df["rating"], errors="coerce")
    if not np.isfinite(ratings.to_numpy(dtype=np.float64)).all():
        raise ReferenceDataError(f"{path}: column {rating_col!r} holds values that are not finite numbers")
    df["rating"] = ratings.astype(np.float64)
    return df


def map_ids(df: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The notebook's cell 8: raw ids to contiguous indices, in order of first appearance.

    Returns:
      (df with ``userId``/``movieId`` replaced by int64 indices, ``users`` raw ids [n_users] in index
      order, ``movies`` raw ids [n_movies] in index order).
    """
    df = df.copy()
    users = df["userId"].unique()
    movies = df["movieId"].unique()

    # Fix (speed, same result): the notebook's dicts `{k: i for i, k in enumerate(users)}` applied per
    # row with `.apply(lambda x: user2idx[x])`; a pandas Index maps the whole column at once.
    user2idx = pd.Index(users)
    movie2idx = pd.Index(movies)

    df["userId"] = user2idx.get_indexer(df["userId"])
    df["movieId"] = movie2idx.get_indexer(df["movieId"])
    return df, users, movies


def split_mask(n: int, seed: int = 42, valid_fraction: float = 0.2) -> np.ndarray:
    """The notebook's 80/20 split as a boolean mask (True = validation).

    Validation is the first ``int(n * valid_fraction)`` entries of
    ``np.random.RandomState(seed).permutation(n)``; ``df[mask]`` and ``df[~mask]`` keep file order.

    Returns:
      bool[n].
    """
    # Fix: the notebook wrote `np.random.seed = 42`, which rebinds the attribute and seeds nothing, so
    # its split changed on every run. A seeded RandomState gives the split the notebook meant.
    n_val = int(n * valid_fraction)
    if n_val < 1 or n - n_val < 1:
        raise ReferenceDataError(f"{n} ratings are too few for a {valid_fraction:g} validation split")
    idxs = np.random.RandomState(seed).permutation(n)
    # validation indexes
    val_idxs = idxs[:n_val]
    mask = np.zeros(n, dtype=bool)
    mask[np.array(val_idxs)] = True
    return mask


class EpochOrderSampler(Sampler[int]):
    """Yields an explicit order of the training rows: ``orders(epoch)`` for the epoch-th pass.

    Passed as ``DataLoader(sampler=...)`` it replaces ``shuffle=True`` without touching ``fit``,
    so a parity test can give PyTorch and jaxcf the very same batches (the last partial one too).
    """

    def __init__(self, orders: Callable[[int], Sequence[int] | np.ndarray], n: int):
        self.orders = orders
        self.n = n
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = np.asarray(self.orders(self.epoch))
        if order.shape != (self.n,):
            raise ValueError(f"orders({self.epoch}) has shape {order.shape}; expected ({self.n},), a position per row")
        self.epoch += 1
        return iter(order.tolist())


def seeded_orders(n: int, seed: int) -> Callable[[int], np.ndarray]:
    """A batch order that is a pure function of (seed, epoch): ``torch.randperm`` with its own generator.

    Returns:
      ``epoch -> int64[n]`` permutation of the training rows.
    """

    def orders(epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=generator).numpy()

    return orders


def make_dataloaders(
    df: pd.DataFrame,
    mask: np.ndarray,
    batch_size: int = 64,
    *,
    generator: torch.Generator | None = None,
    orders: Callable[[int], Sequence[int] | np.ndarray] | None = None,
    num_workers: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """The notebook's cell 15: training (shuffled) and validation (in order, batches of 2x) loaders.

    Args:
      df: ``userId``, ``movieId`` indices and ``rating``; each batch is float64[batch, 3] as in the notebook.
      mask: bool[n], True for validation rows.
      generator: seeds the shuffle (None: PyTorch's global RNG, as the notebook).
      orders: an explicit ``epoch -> positions into df[~mask]`` order instead of the shuffle.
      num_workers: the notebook's 1; 0 loads in the main process (same batches; tests use it so that
        no process is forked from one that has JAX loaded).

    Returns:
      (train_dl, valid_dl).
    """
    train = df[~mask].values
    valid = df[mask].values
    if orders is None:
        train_dl = DataLoader(train, batch_size, shuffle=True, num_workers=num_workers, generator=generator)
    else:
        sampler = EpochOrderSampler(orders, len(train))
        train_dl = DataLoader(train, batch_size, sampler=sampler, num_workers=num_workers)
    valid_dl = DataLoader(valid, batch_size * 2, shuffle=False, num_workers=num_workers)
    return train_dl, valid_dl


# ------------------------------------------------------------------------------ Models


class EmbeddingDotProd(nn.Module):
    def __init__(self, n_users: int, n_movies: int, n_factors: int, *, generator: torch.Generator | None = None):
        super().__init__()
        # Users embedding layer: dim = number of users x number of factors.
        self.users = nn.Embedding(n_users, n_factors)
        # Movies embedding layer: dim = number of movies x number of factors.
        self.movies = nn.Embedding(n_movies, n_factors)

        # The two embedding matrices are randomly initialized (we do not use any pre-trained vectors)
        # But it is important to randomly initialize them to a reasonable set of numbers / scale.
        self.users.weight.data.uniform_(0, 0.05, generator=generator)
        self.movies.weight.data.uniform_(0, 0.05, generator=generator)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        """Args: data int64[batch, 2] (user index, movie index). Returns: float32[batch]."""
        u, m = data[:, 0], data[:, 1]
        # Compute dot product between users vectors and movies vectors.
        return (self.users(u) * self.movies(m)).sum(1)


def get_emb(num_embeddings: int, embedding_dim: int, generator: torch.Generator | None = None) -> nn.Embedding:
    emb = nn.Embedding(num_embeddings, embedding_dim)
    emb.weight.data.uniform_(-0.01, 0.01, generator=generator)
    return emb


class EmbeddingDotProdBias(nn.Module):
    def __init__(
        self,
        n_users: int,
        n_movies: int,
        n_factors: int,
        *,
        min_rating: float,
        max_rating: float,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.users = get_emb(n_users, n_factors, generator)
        self.movies = get_emb(n_movies, n_factors, generator)
        # Bias embedding layer for users: dim = number of users x 1.
        self.users_b = get_emb(n_users, 1, generator)
        # Bias embedding layer for movies: dim = number of movies x 1.
        self.movies_b = get_emb(n_movies, 1, generator)
        # Fix: the notebook's forward read the globals `min_rating` and `max_rating`.
        self.min_rating = float(min_rating)
        self.max_rating = float(max_rating)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        """Args: data int64[batch, 2] (user index, movie index). Returns: float32[batch] in [min, max]."""
        u, m = data[:, 0], data[:, 1]
        # Compute dot product between users vectors and movies vectors.
        um = (self.users(u) * self.movies(m)).sum(1)
        # Add bias
        res = um + self.users_b(u).squeeze() + self.movies_b(m).squeeze()
        # Transform results to desired output scale: min_rating - max_rating.
        res = F.sigmoid(res) * (self.max_rating - self.min_rating) + self.min_rating
        return res


# ------------------------------------------------------------------------------ Training


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def fit(
    model: nn.Module,
    train_dl: DataLoader,
    n_epochs: int,
    optim: torch.optim.Optimizer,
    criterion: nn.Module,
    valid_dl: DataLoader,
    *,
    on_epoch: Callable[[int, nn.Module, dict], None] | None = None,
    verbose: bool = True,
) -> list[dict]:
    """The notebook's training loop, printing ``[epoch, debiased train loss, val loss]`` per epoch.

    Args:
      valid_dl: Fix: the notebook read the global ``valid_dl``.
      on_epoch: called after each epoch's validation with (epoch, model, row); not in the notebook.
      verbose: print the notebook's rows and draw the bar.

    Returns:
      One dict per epoch: ``epoch`` (0-based, as printed), ``train_loss`` (debiased moving average of
      the batch losses), ``val_loss`` (the notebook's mean of per-batch validation MSEs).
    """
    # Fix: tqdm_notebook is tqdm.auto (notebook widget in Jupyter, text elsewhere).
    bar = tqdm(total=n_epochs, disable=None if verbose else True, leave=False)
    device = _device(model)

    avg_mom = 0.98
    avg_loss = 0.
    batch_num = 0
    history = []

    for epoch in range(n_epochs):
        for batch in train_dl:
            batch_num += 1

            # Fix: no Variable (tensors track gradients themselves); the model's device, not a hard .cuda().
            inp = batch[:, :2].long().to(device)
            targ = batch[:, 2].float().to(device)

            # Forward pass: compute predicted y by passing x to the model.
            pred = model(inp)

            # Compute loss: we pass Variables containing the predicted and true values of y.
            loss = criterion(pred, targ)

            # Zero the gradients before running the backward pass.
            # Fix: the notebook called the global `opt` here, not the `optim` argument.
            optim.zero_grad()

            # Backward pass: compute gradient of the loss with respect to all the learnable parameters of the model.
            loss.backward()

            # Calling the step function on an Optimizer makes an update to its parameters.
            optim.step()

            # Exponentially weighted moving average, to make the reported loss more stable.
            # Fix: loss.data[0] fails on a 0-d tensor; .item() is the Python float it meant.
            avg_loss = avg_loss * avg_mom + loss.item() * (1-avg_mom)

            # Compute bias-corrected loss estimate.
            debias_loss = avg_loss / (1 - avg_mom**batch_num)

        # Compute validation loss.
        val = validate(model, valid_dl, criterion)

        row = {"epoch": epoch, "train_loss": debias_loss, "val_loss": val[0]}
        history.append(row)
        if verbose:
            tqdm.write(str(np.round([epoch, debias_loss] + val, 6)))
        if on_epoch is not None:
            on_epoch(epoch, model, row)
        bar.update()
    bar.close()
    return history


def validate(model: nn.Module, dl: DataLoader, criterion: nn.Module) -> list[float]:
    """The notebook's validation: ``[mean over batches of the batch loss]`` (batches of 128).

    The last, smaller batch weighs like a full one, so this differs slightly from the MSE over all ratings.
    """
    loss = []
    device = _device(model)

    # Not a fix of the arithmetic: no autograd graph is needed for a forward-only pass.
    with torch.no_grad():
        for batch in dl:
            inp = batch[:, :2].long().to(device)
            targ = batch[:, 2].float().to(device)

            # In order to compute validation loss we only do forward pass.
            pred = model(inp)

            loss.append(criterion(pred, targ).item())

    return [np.mean(loss)]


def predict(model: nn.Module, dl: DataLoader) -> np.ndarray:
    """Predictions for every row of ``dl`` in its order (not in the notebook; for RMSE and parity).

    Returns:
      float32[n] on the host.
    """
    device = _device(model)
    out = []
    with torch.no_grad():
        for batch in dl:
            out.append(model(batch[:, :2].long().to(device)).reshape(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)
