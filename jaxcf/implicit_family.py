"""What the implicit-feedback families share: their records and closing metrics on the protocol.

Every epoch's record of an implicit family holds the ranking metrics of the implicit protocol on the
held-out interactions of the validation part (``jaxcf.ranking.implicit_metrics``: recall, NDCG, MAP,
hit rate and coverage at 10, 20 and 50, MRR, ``protocol``, ``scored_users``, ``candidates``; keys
unprefixed, ``ndcg@20``) and, when the data has a test part, the same on it prefixed ``test_``
(``test_ndcg@20``), beside its ``train_loss``; the closing record is the exported model's, scored from
the exported tables. A user without training interactions is ranked as ``recommend`` answers them (the
cold start), never from an untrained row.

What does not live here: the families (``jaxcf.ials``, ``jaxcf.bpr``, ``jaxcf.ease``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf import ranking
from jaxcf.data import Dataset
from jaxcf.models import score_block

# The terminal table of an implicit run: (record key, header).
COLUMNS = (("train_loss", "train_loss"), ("recall@20", "recall@20"), ("ndcg@20", "ndcg@20"))


def table_columns() -> tuple:
    return COLUMNS


def metrics(dataset: Dataset, params, layout=None) -> dict:
    """The protocol's metrics of a dot-scored model's tables (device or host arrays)."""
    ratings, split = dataset.ratings, dataset.split
    if layout is None:
        device = jax.tree.map(jnp.asarray, params)

        def score(users):
            return score_block(device, jnp.asarray(users, jnp.int32), None)
    else:
        def score(users):
            scores = layout.fetch(lambda p, u: score_block(p, u, None), params, np.asarray(users, np.int32))
            return scores[:, : ratings.num_items]  # the item table is padded to the mesh

    out = {}
    for rows, prefix in ((split.valid, ""), (split.test, "test_")):
        if len(rows):
            found = ranking.implicit_metrics(score, ratings.num_items, ratings.users[split.train],
                                             ratings.items[split.train], ratings.users[rows], ratings.items[rows])
            out.update({prefix + name: value for name, value in found.items()})
    return out


def implicit_record(dataset: Dataset, params, layout, number: int, train_loss: float) -> dict:
    return {"epoch": number + 1, "train_loss": train_loss, **metrics(dataset, params, layout)}


def implicit_final(dataset: Dataset, host_params) -> dict:
    return metrics(dataset, host_params)
