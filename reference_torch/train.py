"""Runs the notebook end to end and prints its table:

    python -m reference_torch.train --model {dot,bias} [--epochs 5] [--optimizer {adam,adamw}]
                                    [--seed 42] [--data PATH] [--device cpu|cuda] [--threads N]
                                    [--load-weights FILE] [--save-weights FILE]

Defaults are the notebook's: 50 factors, batch size 64, ``torch.optim.Adam`` at lr 1e-3 with weight
decay 1e-4 (coupled L2) for the biased model and 0 for the dot model. ``--optimizer adamw`` takes
``torch.optim.AdamW`` with the same decay, decoupled: the PyTorch counterpart of jaxcf's default.
Expected on the bundled data (notebook): val RMSE ~1.057 (dot), ~0.879 (bias) after 5 epochs.

What does not live here: the notebook's code itself (``reference_torch.notebook``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from reference_torch.notebook import (
    BUNDLED_RATINGS,
    EmbeddingDotProd,
    EmbeddingDotProdBias,
    ReferenceDataError,
    fit,
    load_ratings,
    make_dataloaders,
    map_ids,
    predict,
    split_mask,
    validate,
)
from reference_torch.weights import WeightsError, load_jaxcf_weights, save_jaxcf_weights

# The notebook's weight decay per model: L2 1e-4 for the biased model (cell 28), none for the dot model (cell 19).
DEFAULT_WEIGHT_DECAY = {"dot": 0.0, "bias": 1e-4}

# Small explicit table; AdamW's own default decay (1e-2) is never used: the decay is always passed.
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_model(
    kind: str,
    n_users: int,
    n_movies: int,
    n_factors: int,
    *,
    min_rating: float,
    max_rating: float,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """``EmbeddingDotProd`` (kind ``dot``) or ``EmbeddingDotProdBias`` (kind ``bias``), on the CPU."""
    if kind == "dot":
        return EmbeddingDotProd(n_users, n_movies, n_factors, generator=generator)
    if kind == "bias":
        return EmbeddingDotProdBias(
            n_users, n_movies, n_factors, min_rating=min_rating, max_rating=max_rating, generator=generator
        )
    raise ValueError(f"unknown model {kind!r}; allowed: dot, bias")


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (coupled L2, the notebook's) or ``torch.optim.AdamW`` (decoupled decay).

    betas and eps are written out (PyTorch's defaults, and jaxcf's) so both sides visibly agree.
    """
    return OPTIMIZERS[name](params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reference_torch.train", description="The notebook's PyTorch training, ported."
    )
    parser.add_argument("--model", choices=("dot", "bias"), default="bias", help="dot: EmbeddingDotProd; bias: ...Bias")
    parser.add_argument("--epochs", type=_non_negative_int, default=5, help="0 only validates (e.g. loaded weights)")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adam", help="adam: the notebook's")
    parser.add_argument("--lr", type=_non_negative_float, default=1e-3)
    parser.add_argument(
        "--weight-decay", type=_non_negative_float, default=None, help="default: 1e-4 for bias, 0 for dot"
    )
    parser.add_argument("--n-factors", type=_positive_int, default=50)
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument("--seed", type=int, default=42, help="seeds torch: initial weights and the shuffle")
    parser.add_argument("--split-seed", type=int, default=42, help="seed of the 80/20 split (the notebook meant 42)")
    parser.add_argument("--data", type=Path, default=BUNDLED_RATINGS, help="a ratings CSV (default: bundled 2016 data)")
    parser.add_argument("--user-col", default="userId")
    parser.add_argument("--item-col", default="movieId")
    parser.add_argument("--rating-col", default="rating")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--num-workers", type=_non_negative_int, default=1, help="DataLoader workers (notebook: 1)")
    parser.add_argument(
        "--threads", type=_positive_int, default=None,
        help="PyTorch CPU threads (default: PyTorch's); 1 is fastest for batches of 64 on a busy CPU",
    )
    parser.add_argument("--load-weights", type=Path, help="start from jaxcf's WORKDIR/model/weights.safetensors")
    parser.add_argument("--save-weights", type=Path, help="write the trained tables under jaxcf's names")
    parser.add_argument("--quiet", action="store_true", help="print only the final line")
    return parser.parse_args(argv)


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ReferenceDataError(f"--device {name!r}: not a device name; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReferenceDataError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # process-wide, so only here in main()
    try:
        device = _device(args.device)
        df = load_ratings(args.data, args.user_col, args.item_col, args.rating_col)
        df, users, movies = map_ids(df)
        n_users, n_movies = len(users), len(movies)
        mask = split_mask(len(df), args.split_seed)
        min_rating, max_rating = float(df["rating"].min()), float(df["rating"].max())
        if args.model == "bias" and not min_rating < max_rating:
            raise ReferenceDataError(f"{args.data}: every rating is {min_rating}; the biased model needs a range")

        # Explicit generators instead of the global RNG: one for the initial weights, one for the shuffle.
        init_generator = torch.Generator().manual_seed(args.seed)
        shuffle_generator = torch.Generator().manual_seed(args.seed + 1)
        train_dl, valid_dl = make_dataloaders(
            df, mask, args.batch_size, generator=shuffle_generator, num_workers=args.num_workers
        )
        model = build_model(
            args.model, n_users, n_movies, args.n_factors,
            min_rating=min_rating, max_rating=max_rating, generator=init_generator,
        )
        if args.load_weights is not None:
            load_jaxcf_weights(model, args.load_weights)
        # Fix: `.to(device)` instead of the notebook's hard `.cuda()`.
        model = model.to(device)
        weight_decay = DEFAULT_WEIGHT_DECAY[args.model] if args.weight_decay is None else args.weight_decay
        opt = build_optimizer(args.optimizer, model.parameters(), args.lr, weight_decay)
    except (ReferenceDataError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    out = sys.stdout
    if not args.quiet:
        print(
            f"{type(model).__name__}: {n_users} users, {n_movies} movies, {args.n_factors} factors; "
            f"{(~mask).sum()} training / {mask.sum()} validation ratings; "
            f"{args.optimizer} lr {args.lr:g} weight decay {weight_decay:g}; device {device}",
            file=out,
        )
        print("[epoch, train loss (debiased moving average), val loss (mean of batch MSEs)]", file=out)
    history = fit(model, train_dl, args.epochs, opt, nn.MSELoss(), valid_dl, verbose=not args.quiet)
    val_loss = history[-1]["val_loss"] if history else validate(model, valid_dl, nn.MSELoss())[0]
    predictions = predict(model, valid_dl)
    targets = df[mask]["rating"].to_numpy()
    exact_rmse = math.sqrt(float(((predictions.astype("float64") - targets) ** 2).mean()))
    # The notebook's RMSE is math.sqrt of the last printed val loss; the exact one weighs every rating alike.
    print(f"val RMSE {math.sqrt(val_loss):.6f} (notebook: sqrt of the val loss); over all ratings {exact_rmse:.6f}")
    if args.save_weights is not None:
        print(f"weights written to {save_jaxcf_weights(model, args.save_weights)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
