"""Bayesian factorisation machines over feature groups, by Gibbs sampling: ``model.kind: bfm``.

A factorisation machine (Rendle 2010) predicts ``y = w0 + sum_j w_j x_j + sum_{a<b} <v_a, v_b> x_a x_b``;
its Bayesian form (Freudenthaler, Schmidt-Thieme & Rendle 2011) puts Normal-Gamma hyper-priors on each
feature group's weights and factors and samples everything by Gibbs, as myFM does. A rating's features
are groups, each switched on in the config section ``bfm``:

=============  ==============================================================================
``user``       the user's id, one-hot (with ``item``: Bayesian MF with biases)
``item``       the item's id, one-hot
``implicit``   the items the user rated, each weighted ``1 / sqrt(|N(u)|)``: SVD++'s implicit feedback
               (Koren 2008, "Factorization meets the neighborhood"; Bayesian SVD++ in Rendle, Zhang &
               Koren 2019, "On the Difficulty of Evaluating Baselines")
``flipped``    the users who rated the item, each weighted ``1 / sqrt(|N(i)|)``: the "flipped" model of
               Rendle, Zhang & Koren 2019
=============  ==============================================================================

Time features (timeSVD++, Koren 2009) are not offered: an exported model answers without a time, and
serving has no time at predict. The sets are built from the training pairs (``implicit_from: train``);
``implicit_from: all`` adds the evaluated pairs (validation and test: who rated what, as the Netflix
Prize allowed), off by default and labelled in every record (``implicit_from``) and in the export.

The rank is ``model.n_factors``, a sweep is an epoch (``train.epochs``), and the prediction is the mean
of ``ensemble.size`` kept samples of ``ensemble.chains`` chains after ``ensemble.burn_in`` sweeps, as
for BPMF; the noise precision is sampled (``ensemble.noise_precision`` is not used), and the priors are
myFM 0.4's defaults (``jaxcf.families.bfm.sampler.Priors``).

The export. The user and item blocks hold one row per user and per item, so a sample's prediction is
``w0 + b_u + b_i + <P(u), Q(i)>`` with ``P(u)`` the sum of the user row's factor vectors (the id's and
its implicit set's, each times its weight), ``Q(i)`` the item row's, and ``b_u``, ``b_i`` each row's
linear terms plus the pairs within it. Each kept sample is exported as a dot model with two more
columns than the rank: users ``[P, b_u, 1]``, items ``[Q, 1, w0 + b_i]``. Fold-in needs what those
tables fold together, so the export also holds :data:`IMPLICIT_TABLE` (each sample's implicit-set
vectors and weights, when the group is on) and :data:`PRIOR_TABLE` (each sample's user-id prior and
noise precision), declared in the model section's ``extra_tables`` (``jaxcf.serving.export``).

This module is the light half (the spec, the config section, its checks); fold-in's maths is
``jaxcf.families.bfm.foldin``; the fit half is ``fit``, the sampler ``sampler``, the blocks ``features``.
"""

from __future__ import annotations

import dataclasses

from jaxcf.core.config import choice
from jaxcf.core.errors import ConfigError
from jaxcf.core.family import EXPLICIT, PRODUCT, Spec
from jaxcf.families import _sections

# The export's tables beyond the dot model's (see the module docstring and jaxcf.families.bfm.foldin):
# IMPLICIT_TABLE float32[K, I, F + 1] is each sample's implicit-set vector of every item, then its
# weight; PRIOR_TABLE float32[K, 3, F + 1] each sample's user-id prior mean (factors, then the weight),
# its precision, and the noise precision alpha (repeated along the row).
IMPLICIT_TABLE, PRIOR_TABLE = "implicit_set", "user_prior"
# What implicit sets may be made of.
IMPLICIT_FROM = ("train", "all")


@dataclasses.dataclass(frozen=True)
class BfmConfig:
    # The feature groups (jaxcf.families.bfm): each side (user, item) needs at least one of its two.
    user: bool = True  # the user's id
    item: bool = True  # the item's id
    implicit: bool = True  # the user's rated items, 1/sqrt(|N(u)|) each: SVD++ (Koren 2008)
    flipped: bool = True  # the item's raters, 1/sqrt(|N(i)|) each: "flipped" (Rendle, Zhang & Koren 2019)
    # What the sets are made of: "train" (the training pairs) or "all" (also the evaluated pairs:
    # who rated what in the validation and test parts; labelled in every record).
    implicit_from: str = "train"


def groups(config) -> dict[str, bool]:
    """The config's feature groups, by name (what the export records)."""
    section = config.bfm
    return {"user": section.user, "item": section.item, "implicit": section.implicit, "flipped": section.flipped}


def validate(config) -> None:
    """The kept samples as BPMF checks them, and the groups.

    Raises:
      ConfigError: naming the key.
    """
    section = config.bfm
    choice("bfm.implicit_from", section.implicit_from, IMPLICIT_FROM)
    if not (section.user or section.implicit):
        raise ConfigError("bfm.user and bfm.implicit are both off: the user side has no feature; switch one on")
    if not (section.item or section.flipped):
        raise ConfigError("bfm.item and bfm.flipped are both off: the item side has no feature; switch one on")
    _sections.sampler(config)


def build(config, dataset, layout=None, orders=None):
    from jaxcf.families.bfm import fit

    return fit.family(config, dataset, layout)


def solver(weights, metadata, counts, prior_scale=None):
    from jaxcf.families.bfm import foldin

    return foldin.Solver(weights, metadata, counts, prior_scale)


SPEC = Spec(
    name="bfm", feedback=EXPLICIT, scoring=PRODUCT,
    summary="Bayesian factorisation machine over id and implicit-set groups by Gibbs sampling (myFM's model)",
    build=build, solver=solver, validate=validate, mesh=False, epochs_fixed="which sweeps it keeps",
    sections=(("bfm", BfmConfig),),
)
