"""What a model family gives the one training loop (``jaxcf.trainer``), and which family a config asks for.

A family is the part of training that differs between kinds of model; the loop does the rest
(epochs, records, the NaN guard, early stopping, checkpoints and resume, the watchdog, the mesh).
Its pieces are plain functions over a state that is a pytree of arrays, so the loop can checkpoint,
restore and shard any family the same way:

========================  =========================================================================
``init``                  ``() -> state``: the seeded initial state, unplaced (the loop puts it on
                          the device or the mesh).
``epoch``                 ``(state, epoch) -> (state, losses)``: one epoch (0-based) as compiled
                          calls, and its per-batch (or per-member, per-chain) losses on the host:
                          the epoch's one host sync.
``record``                ``(state, epoch, losses, carry) -> (record, carry)``: the epoch's metrics
                          (validation included) and the family's host-side state (``carry``, JSON,
                          checkpointed with the state). Raises ``TrainingDiverged`` with a message
                          that says what to change.
``params``                ``state -> tables``: the model's parameters (a member axis for ensembles).
``row_axes``              ``state -> axes``: each leaf's row axis (or None) for the mesh.
``final``                 ``host tables -> metrics``: the exported model's closing metrics (RMSE and
                          ranking metrics, scored exactly as a loaded model scores).
``model_info``            what the export records about the model (kind, sizes, y_range, members).
========================  =========================================================================

The families: ``sgd`` (one model by a gradient optimizer: ``jaxcf.sgd``), ``members`` (K such
models side by side: ``jaxcf.members``), ``gibbs`` (Bayesian MF by Gibbs sampling: ``jaxcf.gibbs``);
for implicit feedback ``ials`` (alternating least squares: ``jaxcf.ials``), ``bpr`` (pairwise
ranking by SGD: ``jaxcf.bpr``), ``ease`` (closed form: ``jaxcf.ease``) and ``blend`` (EASE and iALS:
``jaxcf.blend``).

What does not live here: the loop (``jaxcf.trainer``), the families themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxcf.config import Config


@dataclasses.dataclass
class Family:
    """One model family's side of training (see the module docstring)."""

    name: str
    init: Callable[[], Any]
    epoch: Callable[[Any, int], tuple[Any, np.ndarray]]
    record: Callable[[Any, int, np.ndarray, dict], tuple[dict, dict]]
    params: Callable[[Any], Any]
    row_axes: Callable[[Any], Any]
    final: Callable[[dict], dict]
    model_info: dict
    # The record key that early stopping watches, and whether higher is better.
    monitor: str = "valid_rmse"
    maximize: bool = False
    # The terminal table's columns after the epoch: (record key, header).
    columns: tuple = (("train_loss", "train_loss"), ("valid_mse", "valid_mse"), ("valid_rmse", "valid_rmse"))


def family_name(config: Config) -> str:
    """Which family trains ``config``: ``ials``, ``bpr``, ``ease``, ``gibbs``, ``members`` (an ensemble of
    seeds) or ``sgd``."""
    if config.model.kind in ("ials", "bpr", "ease", "blend"):
        return config.model.kind
    if config.ensemble.method == "gibbs":
        return "gibbs"
    return "members" if config.ensemble.size > 1 else "sgd"
