"""Bayesian matrix factorisation (BPMF, Salakhutdinov & Mnih 2008) by Gibbs sampling: ``model.kind: bpmf``.

The prediction is the mean of ``ensemble.size`` posterior samples kept from ``ensemble.chains`` chains of
``train.epochs`` sweeps after ``ensemble.burn_in``; ``ensemble.noise_precision`` is the noise precision
alpha. Each sample is exported as a dot model with the mean rating folded in (F + 1 columns: the users'
last column is 1, the items' the mean), so predict, top-k and the server need nothing of their own.

This module is the light half (the spec: config checks, fold-in). Fold-in solves a user's row from the
BPMF conditional per kept sample (``jaxcf.core.foldin``, the users' constant column held fixed). The fit
half is ``fit``.
"""

from __future__ import annotations

from jaxcf.core.family import EXPLICIT, PRODUCT, Spec
from jaxcf.core.foldin import Solver
from jaxcf.families import _sections

# Fold-in's prior: the sampler's own (the users' rows fitted by the model), at full strength.
PRIOR_SCALE = 1.0


def validate(config) -> None:
    _sections.sampler(config)


def build(config, dataset, layout=None, orders=None):
    from jaxcf.families.bpmf import fit

    return fit.family(config, dataset, layout)


def solver(weights, metadata, counts, prior_scale=None):
    return Solver(weights, metadata, counts, prior_scale, fixed_last=True, default_scale=PRIOR_SCALE)


SPEC = Spec(
    name="bpmf", feedback=EXPLICIT, scoring=PRODUCT,
    summary="Bayesian matrix factorisation by Gibbs sampling: the mean of kept posterior samples",
    build=build, solver=solver, validate=validate, epochs_fixed="which sweeps it keeps",
)
