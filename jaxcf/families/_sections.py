"""The config sections the families share: ``model`` (every family), ``ensemble`` (members of a prediction:
seeds of SGD models, samples of a sampler) and ``implicit`` (the implicit-feedback families), with the range
checks of their keys. A family's own checks of how the sections combine live in its spec.

What does not live here: the core sections (``jaxcf.core.config``), the registry (``jaxcf.families``).
"""

from __future__ import annotations

import dataclasses

from jaxcf.core.config import MAX_FACTORS, MAX_MEMBERS, at_least, at_most, check_range, choice, non_negative, positive
from jaxcf.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # The model family (jaxcf.families): "bias" is the notebook's EmbeddingDotProdBias and "dot" its
    # EmbeddingDotProd (explicit ratings, trained by a gradient optimizer); "bpmf" Bayesian MF and "bfm" a
    # Bayesian factorisation machine, by Gibbs sampling; "ials", "bpr", "ease" and "blend" (EASE and iALS)
    # learn from implicit feedback.
    kind: str = "bias"
    n_factors: int = 50
    # Output range of the biased model's scaled sigmoid; null takes (min, max) of the ratings.
    y_range: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    # Members whose predictions are averaged: for "bias" and "dot", `size` models trained side by side in
    # one vmapped program with seeds seed, seed+1, ... (one data split, from `seed`; 1: a single model);
    # for a sampler ("bpmf"), the posterior samples kept.
    size: int = 1
    # Samplers: independent chains sampled side by side; size must be a multiple of chains.
    chains: int = 1
    # Samplers: sweeps discarded before samples are kept.
    burn_in: int = 20
    # bpmf: alpha, the precision (1 / variance) of a rating around its predicted value.
    noise_precision: float = 2.0
    # Before model.kind bpmf, "gibbs" (with model.kind dot) named BPMF; such configs are read as bpmf.
    method: str = "seeds"


@dataclasses.dataclass(frozen=True)
class ImplicitConfig:
    # iALS (Hu, Koren & Volinsky 2008): an interaction's confidence is 1 + alpha, every other pair's 1.
    alpha: float = 1.0
    # iALS: L2 on each row, lambda * (alpha * |row's interactions| + |other side|) ** reg_exponent:
    # reg_exponent 0 is plain L2 (Hu et al., implicit's ALS), 1 frequency-scaled (Rendle et al. 2022).
    regularization: float = 0.1
    reg_exponent: float = 0.0
    # iALS: exact F x F solves ("cholesky") or conjugate gradient warm-started from the last sweep
    # ("cg", cg_steps steps per row and sweep), cheaper for large F.
    solver: str = "cholesky"
    cg_steps: int = 3
    # iALS and BPR: the standard deviation of the normal initial factors.
    init_std: float = 0.1
    # BPR (Rendle et al. 2009): negatives sampled uniformly per positive, and the L2 weight of the
    # rows a triple touches, in the loss. Trained with optim (lazy_adam recommended).
    negatives: int = 1
    l2: float = 1.0e-4
    # BPR: negatives drawn uniformly from the catalogue ("uniform") or as the item of a random training
    # interaction ("popularity", as the implicit library draws them); verify_negatives skips a triple
    # whose negative the user has interacted with (implicit's verify_negative_samples).
    negative_sampling: str = "uniform"
    verify_negatives: bool = False
    # EASE (Steck 2019): the L2 weight lambda of the closed-form item-item model.
    ease_lambda: float = 500.0
    # blend: EASE's scores times this plus iALS's times (1 - this); both models regress the same 0/1
    # matrix, so their scores share a scale.
    blend_ease_weight: float = 0.5


SECTIONS = (("model", ModelConfig), ("ensemble", EnsembleConfig), ("implicit", ImplicitConfig))


def validate(config) -> None:
    """The range checks of the shared sections' keys.

    Raises:
      ConfigError: naming the first offending key.
    """
    at_least("model.n_factors", config.model.n_factors, 1)
    at_most("model.n_factors", config.model.n_factors, MAX_FACTORS)
    check_range("model.y_range", config.model.y_range)
    ensemble = config.ensemble
    for key in ("size", "chains"):
        at_least(f"ensemble.{key}", getattr(ensemble, key), 1)
    at_most("ensemble.size", ensemble.size, MAX_MEMBERS)
    at_least("ensemble.burn_in", ensemble.burn_in, 0)
    positive("ensemble.noise_precision", ensemble.noise_precision)
    choice("ensemble.method", ensemble.method, ("seeds", "gibbs"))
    implicit = config.implicit
    for key in ("alpha", "regularization", "reg_exponent", "l2", "ease_lambda"):
        non_negative(f"implicit.{key}", getattr(implicit, key))
    positive("implicit.init_std", implicit.init_std)
    for key in ("cg_steps", "negatives"):
        at_least(f"implicit.{key}", getattr(implicit, key), 1)
    choice("implicit.solver", implicit.solver, ("cholesky", "cg"))
    choice("implicit.negative_sampling", implicit.negative_sampling, ("uniform", "popularity"))
    if not 0 <= implicit.blend_ease_weight <= 1:
        raise ConfigError(f"implicit.blend_ease_weight: must be in [0, 1]; got {implicit.blend_ease_weight!r}")


def single_model(config, why: str) -> None:
    """Refuses an ensemble (``ensemble.size`` > 1) for a family that trains one model."""
    if config.ensemble.size != 1:
        raise ConfigError(f"model.kind {config.model.kind}: {why}; set ensemble.size: 1")


def sampler(config) -> None:
    """What every Gibbs sampler's config must hold (``bpmf``, ``bfm``): ``ensemble.size`` kept samples,
    a whole number per chain, that fit in ``train.epochs`` sweeps after ``ensemble.burn_in``; no early
    stopping.

    Raises:
      ConfigError: naming the key.
    """
    ensemble = config.ensemble
    if ensemble.size % ensemble.chains:
        raise ConfigError(f"ensemble.size ({ensemble.size}) must be a multiple of ensemble.chains ({ensemble.chains})")
    per_chain = ensemble.size // ensemble.chains
    if config.train.epochs - ensemble.burn_in < per_chain:
        raise ConfigError(
            f"train.epochs ({config.train.epochs} sweeps) leaves fewer than {per_chain} sweeps per chain after "
            f"ensemble.burn_in ({ensemble.burn_in}); raise train.epochs or lower ensemble.size"
        )
    if config.train.early_stopping_patience:
        raise ConfigError(f"train.early_stopping_patience does not apply to a sampler (model.kind "
                          f"{config.model.kind}); set it to 0")
