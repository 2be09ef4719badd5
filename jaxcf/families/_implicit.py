"""What the implicit-feedback families share: their config checks, their records and closing metrics on the
protocol, and the base of their fold-in solvers.

Every epoch's record of an implicit family holds the ranking metrics of the implicit protocol on the
held-out interactions of the validation part (``jaxcf.core.ranking.split_implicit_metrics``: recall, NDCG,
MAP, hit rate and coverage at 10, 20 and 50, MRR, ``protocol``, ``scored_users``, ``candidates``; keys
unprefixed, ``ndcg@20``) and, when the data has a test part, the same on it prefixed ``test_``
(``test_ndcg@20``), beside its ``train_loss``; the closing record is the exported model's, scored from the
exported tables. A user without training interactions is ranked as ``recommend`` answers them (the cold
start), never from an untrained row.

Fold-in of an implicit model (:class:`InteractionSolver`): a user's row from their interactions, the items
frozen; only ratings of at least the model's ``data.implicit_threshold`` count (as in training), and their
values are not used. Each family's solver says how a row is solved.

What does not live here: the families (``jaxcf.families.ials``, ``bpr``, ``ease``, ``blend``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxcf.core import ranking
from jaxcf.core.errors import ConfigError
from jaxcf.core.models import score_block
from jaxcf.core.scoring import bucket
from jaxcf.data import Dataset
from jaxcf.families._sections import single_model

# The terminal table of an implicit run: (record key, header).
COLUMNS = (("train_loss", "train_loss"), ("recall@20", "recall@20"), ("ndcg@20", "ndcg@20"))
# Interactions of one fold-in call are padded to a power of two of at least this many: few compiled shapes.
MIN_PAIRS = 64


def validate(config) -> None:
    """What every implicit family requires: one model, and none of the rating models' optimizer extras."""
    single_model(config, "ensembles are of rating models")
    if config.optim.row_l2 or config.optim.schedule != "constant":
        raise ConfigError(f"model.kind {config.model.kind}: optim.row_l2 and optim.schedule are for rating models")


def metrics(dataset: Dataset, params, layout=None) -> dict:
    """The protocol's metrics of a dot-scored model's tables (device or host arrays) on the dataset's parts."""
    num_items = dataset.ratings.num_items
    if layout is None:
        device = jax.tree.map(jnp.asarray, params)

        def score(users):
            return score_block(device, jnp.asarray(users, jnp.int32), None)
    else:
        def score(users):
            scores = layout.fetch(lambda p, u: score_block(p, u, None), params, np.asarray(users, np.int32))
            return scores[:, :num_items]  # the item table is padded to the mesh

    return ranking.split_implicit_metrics(dataset, score)


def record(dataset: Dataset, params, layout, number: int, train_loss: float, evaluate: bool) -> dict:
    """An epoch's record: its training loss and, when ``evaluate``, the protocol's metrics."""
    out = {"epoch": number + 1, "train_loss": train_loss}
    return {**out, **metrics(dataset, params, layout)} if evaluate else out


def final(dataset: Dataset, host_params) -> dict:
    return metrics(dataset, host_params)


class InteractionSolver:
    """Solves users of an implicit-feedback export from their interactions (the interface of
    ``jaxcf.core.foldin.Solver``: ``solve``, ``tables``, ``members``, ``prior_scale``, ``features``).

    Subclasses give ``solve_rows(user_of, items, num_users) -> float32[num_users, d]``.
    """

    members = False
    prior_scale = None

    def __init__(self, weights: Mapping[str, np.ndarray], metadata: Mapping):
        self.weights = weights
        self.model = metadata["model"]
        self.num_items = int(weights["item_embedding"].shape[0])
        self.features = weights["item_embedding"][None]
        config = metadata.get("config") or {}
        self.implicit = config.get("implicit") or {}
        data = metadata.get("data") or {}
        # New ratings under this are not interactions (training's data.implicit_threshold).
        self.threshold = float(data.get("implicit_threshold") or (config.get("data") or {}).get(
            "implicit_threshold", 4.0))

    def hyper(self, key: str, default: float) -> float:
        """A hyper-parameter of the ``implicit`` section the model was trained with."""
        return float(self.implicit.get(key, default))

    def solve(self, user_of: np.ndarray, items: np.ndarray, ratings: np.ndarray, num_users: int) -> np.ndarray:
        """float32[1, num_users, d] rows (``ratings`` are not used: every interaction counts as one)."""
        return self.solve_rows(user_of, items, num_users)[None]

    def solve_rows(self, user_of: np.ndarray, items: np.ndarray, num_users: int) -> np.ndarray:
        raise NotImplementedError

    def tables(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows as the export's user table."""
        return {"user_embedding": rows[0].astype(np.float32)}

    @staticmethod
    def padded(user_of: np.ndarray, items: np.ndarray, num_users: int) -> tuple:
        """(items, valid, rows, padded users): a call's interactions padded to powers of two."""
        pairs, users = bucket(max(MIN_PAIRS, len(items))), bucket(max(1, num_users))
        pad = pairs - len(items)
        return (np.pad(items.astype(np.int32), (0, pad)), np.pad(np.ones(len(items), np.float32), (0, pad)),
                np.pad(user_of.astype(np.int32), (0, pad)), users)

    @staticmethod
    def indicator(user_of: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> np.ndarray:
        """float32[num_users, num_items]: 1 where a user interacted with an item."""
        rows = np.zeros((num_users, num_items), np.float32)
        rows[user_of, items] = 1.0
        return rows
