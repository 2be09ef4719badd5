"""The notebook's two models, trained by a gradient optimizer: ``bias`` (``EmbeddingDotProdBias``: a scaled
sigmoid of the dot product plus biases) and ``dot`` (``EmbeddingDotProd``), one model or an ensemble of
``ensemble.size`` of them trained side by side (seeds seed, seed+1, ...).

This module is the light half (the two specs: config checks, fold-in maths). The fit half is
``fit`` (one model), ``members`` (K models in one vmapped program) and ``sweep`` (grids of members).

Fold-in (``jaxcf.core.foldin``): a Bayesian ridge solve with a prior fitted to the model's users for
``dot``; damped Gauss-Newton through the sigmoid for ``bias``, whose prior is weakened (``PRIOR_SCALES``:
chosen on held-out training users, docs/results.md).
"""

from __future__ import annotations

from jaxcf.core.errors import ConfigError
from jaxcf.core.family import EXPLICIT, PRODUCT, SIGMOID, Spec
from jaxcf.core.foldin import Solver

# Fold-in's prior strength by kind: the biased model's SGD-trained user rows spread wider than its ratings
# warrant, so its prior is weakened (python -m jaxcf.crossval --protocol strong --choose-prior-scale).
PRIOR_SCALES = {"bias": 0.25, "dot": 1.0}
DENSE = ("adam", "adamw")


def validate(config) -> None:
    """Ensembles, row L2 and schedules need a dense optimizer (the row-sparse ones keep their
    hyper-parameters outside the state, so members cannot differ in them)."""
    if config.optim.name not in DENSE and (
        config.ensemble.size > 1 or config.optim.row_l2 > 0 or config.optim.schedule != "constant"
    ):
        raise ConfigError(
            f"optim.name {config.optim.name!r}: ensembles, optim.row_l2 and optim.schedule train with adam or adamw "
            "(the row-sparse optimizers keep their hyper-parameters outside the state)"
        )


def build(config, dataset, layout=None, orders=None):
    """One model (``fit``) or an ensemble of seeds (``members``)."""
    from jaxcf.families.sgd import fit, members

    setup = fit.make_setup(config, dataset)
    if config.ensemble.size > 1:
        return members.family(setup, members.seed_members(config), layout)
    return fit.family(setup, layout, orders)


def _solver(sigmoid: bool, kind: str):
    def make(weights, metadata, counts, prior_scale=None):
        return Solver(weights, metadata, counts, prior_scale, sigmoid=sigmoid, default_scale=PRIOR_SCALES[kind])

    return make


BIAS = Spec(
    name="bias", feedback=EXPLICIT, scoring=SIGMOID,
    summary="the notebook's EmbeddingDotProdBias: sigmoid(u . v + b_u + b_i) scaled to the rating range",
    build=build, solver=_solver(True, "bias"), validate=validate, members=lambda config: config.ensemble.size,
    cold_start_by_bias=True,
)
DOT = Spec(
    name="dot", feedback=EXPLICIT, scoring=PRODUCT, summary="the notebook's EmbeddingDotProd: u . v",
    build=build, solver=_solver(False, "dot"), validate=validate, members=lambda config: config.ensemble.size,
)
