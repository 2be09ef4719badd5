"""The blend's fit half (``jaxcf.families.blend``): the first epoch solves EASE (``implicit.ease_lambda``) and
runs an iALS sweep; each further epoch is one more iALS sweep (``implicit.*``, ``model.n_factors``).

What does not live here: the parts (``jaxcf.families.ease``, ``jaxcf.families.ials``), the loop.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxcf.core import distributed
from jaxcf.core.family import Family
from jaxcf.data import Dataset
from jaxcf.families import _implicit
from jaxcf.families.blend import SPEC
from jaxcf.families.ease import fit as ease
from jaxcf.families.ials import fit as ials


def join(ease_params: dict, ials_params: dict, weight: float) -> dict:
    """The blended dot model's tables (see the module docstring)."""
    return {
        "user_embedding": jnp.concatenate([weight * ease_params["user_embedding"],
                                           (1 - weight) * ials_params["user_embedding"]], axis=1),
        "item_embedding": jnp.concatenate([ease_params["item_embedding"], ials_params["item_embedding"]], axis=1),
    }


def family(config: Any, dataset: Dataset, layout=None) -> Family:
    """EASE and iALS on ``dataset``'s implicit training interactions, blended (one device)."""
    parts = ease.family(config, dataset), ials.family(config, dataset)
    weight = float(config.implicit.blend_ease_weight)
    num_items = dataset.ratings.num_items

    def init():
        return {"ease": parts[0].init(), "ials": parts[1].init()}

    def epoch(state, number):
        solved = parts[0].epoch(state["ease"], 0)[0] if number == 0 else state["ease"]
        swept, losses = parts[1].epoch(state["ials"], number)
        return {"ease": solved, "ials": swept}, losses

    def params(state):
        return join(parts[0].params(state["ease"]), parts[1].params(state["ials"]), weight)

    def record(state, number, losses, carry, evaluate=True):
        return _implicit.record(dataset, params(state), None, number, float(losses[0]), evaluate), carry

    info = parts[1].model_info
    return Family(
        name=SPEC.name, init=init, epoch=epoch, record=record, params=params,
        row_axes=distributed.single_row_axes, final=lambda host: _implicit.final(dataset, host),
        model_info=SPEC.model_info(n_factors=num_items + config.model.n_factors, y_range=None,
                                   num_users=info["num_users"], num_items=num_items,
                                   blend={"ease_columns": num_items, "ease_weight": weight}),
        divergence_hint="raise implicit.regularization",
        monitor="ndcg@20", maximize=True, columns=_implicit.COLUMNS,
    )
