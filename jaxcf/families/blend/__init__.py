"""A blend of EASE and iALS as one family: ``model.kind: blend``, scores ``w * EASE + (1 - w) * iALS``.

Both models regress the same 0/1 interaction matrix (EASE ``X B``, iALS ``U V'``), so their scores share a
scale and a fixed weight ``w`` (``implicit.blend_ease_weight``) blends them. A blend of dot models is
itself a dot model with the tables side by side:

    user row [w x_u, (1 - w) u],   item row [B[:, i], v_i]   ->   w (x_u B)_i + (1 - w) u . v_i

so the export, ``load_model``, top-k, the server and the metrics need nothing new. This module is the
light half (the spec; fold-in solves each part, EASE's indicator and iALS's exact row); the fit half is
``fit``.
"""

from __future__ import annotations

import numpy as np

from jaxcf.core.family import IMPLICIT, PRODUCT, Spec
from jaxcf.families import _implicit, ease, ials


class FoldIn(_implicit.InteractionSolver):
    """Each part's row, weighted and set side by side (EASE's columns first, as the export records)."""

    def __init__(self, weights, metadata, counts=None, prior_scale=None):
        super().__init__(weights, metadata)
        blend = self.model.get("blend") or {}
        self.ease_columns = int(blend.get("ease_columns", 0))
        self.ease_weight = float(blend.get("ease_weight", 0.0))
        self.ease = ease.FoldIn(weights, metadata)
        self.ials = ials.FoldIn(weights, metadata, columns=slice(self.ease_columns, None))

    def solve_rows(self, user_of, items, num_users):
        indicator = self.ease.solve_rows(user_of, items, num_users)
        factors = self.ials.solve_rows(user_of, items, num_users)
        return np.concatenate([self.ease_weight * indicator, (1 - self.ease_weight) * factors], axis=1)


def build(config, dataset, layout=None, orders=None):
    from jaxcf.families.blend import fit

    return fit.family(config, dataset, layout)


SPEC = Spec(
    name="blend", feedback=IMPLICIT, scoring=PRODUCT,
    summary="EASE and iALS blended (one dot model, the tables side by side)", build=build, solver=FoldIn,
    validate=_implicit.validate, mesh=False,
)
