"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): ``model.kind: ease``, closed form.

The item-item matrix ``B`` minimises ``|X - X B|^2 + lambda |B|^2`` subject to ``diag(B) = 0``, with ``X``
the binary user-item matrix of the training interactions (``implicit.ease_lambda``); a user's scores are
``x_u B``. The export is a dot model with F = the number of items: user rows ``x_u``, item rows
``B[:, i]``. This module is the light half (the spec; fold-in: a user's row is their interaction
indicator, nothing to solve); the fit half is ``fit``.
"""

from __future__ import annotations

from jaxcf.core.errors import ConfigError
from jaxcf.core.family import IMPLICIT, PRODUCT, Spec
from jaxcf.families import _implicit


def validate(config) -> None:
    _implicit.validate(config)
    if config.train.epochs != 1:
        raise ConfigError("model.kind ease is solved in closed form, in one step: set train.epochs: 1")


class FoldIn(_implicit.InteractionSolver):
    """A user's row is their interaction indicator."""

    def __init__(self, weights, metadata, counts=None, prior_scale=None):
        super().__init__(weights, metadata)

    def solve_rows(self, user_of, items, num_users):
        return self.indicator(user_of, items, num_users, self.num_items)


def build(config, dataset, layout=None, orders=None):
    from jaxcf.families.ease import fit

    return fit.family(config, dataset, layout)


SPEC = Spec(
    name="ease", feedback=IMPLICIT, scoring=PRODUCT,
    summary="EASE (Steck 2019): a closed-form item-item model", build=build, solver=FoldIn, validate=validate,
    mesh=False,
)
