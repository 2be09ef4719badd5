"""A blend of EASE and iALS as one family: scores ``w * EASE + (1 - w) * iALS``, one dot model.

Both models regress the same 0/1 interaction matrix (EASE ``X B``, iALS ``U V'``), so their scores
share a scale and a fixed weight ``w`` (``implicit.blend_ease_weight``) blends them. A blend of dot
models is itself a dot model with the tables side by side:

    user row [w x_u, (1 - w) u],   item row [B[:, i], v_i]   ->   w (x_u B)_i + (1 - w) u . v_i

so the export, ``load_model``, top-k, the server and the metrics need nothing new. The first epoch
solves EASE (``implicit.ease_lambda``) and runs an iALS sweep; each further epoch is one more iALS
sweep (``implicit.*``, ``model.n_factors``). Fold-in solves each part (``jaxcf.foldin_implicit``).

What does not live here: the parts (``jaxcf.ease``, ``jaxcf.ials``), the loop.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxcf import distributed, ease, ials
from jaxcf.config import Config
from jaxcf.data import Dataset
from jaxcf.errors import ConfigError
from jaxcf.family import Family
from jaxcf.implicit_family import implicit_final, implicit_record, table_columns


def join(ease_params: dict, ials_params: dict, weight: float) -> dict:
    """The blended dot model's tables (see the module docstring)."""
    return {
        "user_embedding": jnp.concatenate([weight * ease_params["user_embedding"],
                                           (1 - weight) * ials_params["user_embedding"]], axis=1),
        "item_embedding": jnp.concatenate([ease_params["item_embedding"], ials_params["item_embedding"]], axis=1),
    }


def family(config: Config, dataset: Dataset, layout=None) -> Family:
    """EASE and iALS on ``dataset``'s implicit training interactions, blended (one device)."""
    if layout is not None:
        raise ConfigError("model.kind blend runs on one device (its EASE part): set mesh.data and mesh.model to 1")
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

    def record(state, number, losses, carry):
        parts[1].record(state["ials"], number, losses, carry)  # iALS's divergence check, with its message
        return implicit_record(dataset, params(state), None, number, float(losses[0])), carry

    info = parts[1].model_info
    return Family(
        name="blend", init=init, epoch=epoch, record=record, params=params,
        row_axes=distributed.single_row_axes, final=lambda host: implicit_final(dataset, host),
        model_info={**info, "family": "blend", "n_factors": num_items + config.model.n_factors,
                    "blend": {"ease_columns": num_items, "ease_weight": weight}},
        monitor="ndcg@20", maximize=True, columns=table_columns(),
    )
