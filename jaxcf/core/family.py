"""The two faces of a model family: :class:`Spec`, what the rest of the library asks of it (its light half:
the registry in ``jaxcf.families`` holds one per ``model.kind``), and :class:`Family`, what it gives the one
training loop (its fit half, built by ``Spec.build``).

A family is the part of training that differs between kinds of model; the loop (``jaxcf.training.loop``)
does the rest: epochs, records, early stopping, the divergence check, checkpoints and resume, the watchdog,
the mesh. A family's pieces are plain functions over a state that is a pytree of arrays, so the loop can
checkpoint, restore and shard any family the same way:

========================  =========================================================================
``init``                  ``() -> state``: the seeded initial state, unplaced (the loop puts it on
                          the device or the mesh, by ``row_axes``).
``epoch``                 ``(state, epoch) -> (state, losses)``: one epoch (0-based) as compiled
                          calls, and its per-batch (or per-member, per-chain) losses on the host:
                          the epoch's one host sync.
``record``                ``(state, epoch, losses, carry, evaluate) -> (record, carry)``: the epoch's
                          record (its metrics when ``evaluate``; the loop asks every
                          ``train.eval_every`` epochs and after the last) and the family's host-side
                          state (``carry``, JSON, checkpointed with the state). A family reports what
                          it computed; a problem it alone can see (a member that diverged) goes in
                          ``record["diverged"]``, and the loop decides.
``finite``                ``state -> bool``: every parameter finite (the loop's check after an epoch).
``params``                ``state -> tables``: the model's parameters (a member axis for ensembles).
``row_axes``              ``state -> axes``: each leaf's row axis (or None) for the mesh.
``final``                 ``host tables -> metrics``: the exported model's closing metrics, scored
                          exactly as a loaded model scores.
``model_info``            what the export records about the model (kind, scoring, sizes, members).
========================  =========================================================================

What does not live here: the loop, the registry and the families themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

EXPLICIT, IMPLICIT = "explicit", "implicit"
# The exported tables' scoring rules (jaxcf.core.models): a plain dot product, or the biased model's
# scaled sigmoid of the dot product plus a user and an item bias.
PRODUCT, SIGMOID = "product", "sigmoid"


@dataclasses.dataclass
class Family:
    """One model family's side of training (see the module docstring)."""

    name: str
    init: Callable[[], Any]
    epoch: Callable[[Any, int], tuple[Any, np.ndarray]]
    record: Callable[[Any, int, np.ndarray, dict, bool], tuple[dict, dict]]
    params: Callable[[Any], Any]
    row_axes: Callable[[Any], Any]
    final: Callable[[dict], dict]
    model_info: dict
    # Every parameter finite (None: not checked, e.g. a closed-form model whose loss says it all).
    finite: Callable[[Any], Any] | None = None
    # What to change when the run diverges, for the loop's message.
    divergence_hint: str = "lower optim.learning_rate"
    # A model RMSE (``valid_rmse_rows``, else ``test_rmse_rows``) above this has left the ratings' scale.
    scale: float | None = None
    # Whether the loop checks the losses (a sweep lets some members diverge and reports them itself).
    check_losses: bool = True
    # The record key that early stopping watches, and whether higher is better.
    monitor: str = "valid_rmse"
    maximize: bool = False
    # The terminal table's columns after the epoch: (record key, header).
    columns: tuple = (("train_loss", "train_loss"), ("valid_mse", "valid_mse"), ("valid_rmse", "valid_rmse"))


@dataclasses.dataclass(frozen=True)
class Spec:
    """A family's light half: what config validation, data preparation, export, inference, fold-in and the
    CLIs ask of it. Importable without optax or orbax (the fit half is imported by ``build``).

    Attributes:
      name: its ``model.kind``.
      feedback: ``"explicit"`` (it predicts ratings) or ``"implicit"`` (it learns from interactions:
        ratings of at least ``data.implicit_threshold``; its scores order items).
      scoring: the exported tables' rule, ``"product"`` or ``"sigmoid"`` (``jaxcf.core.models``).
      summary: one line on what it is, for messages and docs.
      build: ``(config, dataset, layout, orders) -> Family`` (imports the fit half).
      solver: ``(weights, metadata, counts, prior_scale) -> solver`` of fold-in (``jaxcf.core.foldin``).
      validate: ``config -> None``, the family's own checks of how the sections combine.
      mesh: whether it trains on a mesh (else a config asking for one is refused in one line).
      epochs_fixed: why ``train.epochs`` may not change on resume (a sampler: which sweeps it keeps), or None.
      members: ``config -> int``, the seeds it uses from ``config.seed`` up (an ensemble's members).
      cold_start_by_bias: an unknown user's answer ranks items by learned item bias (else by count).
      sections: ``(name, dataclass)`` config sections of the family's own (beyond the shared ones).
      times: ``config -> bool``, whether the family reads the ratings' timestamps (every part's).
    """

    name: str
    feedback: str
    scoring: str
    summary: str
    build: Callable[..., Family]
    solver: Callable[..., Any]
    validate: Callable[[Any], None] = lambda config: None
    mesh: bool = True
    epochs_fixed: str | None = None
    members: Callable[[Any], int] = lambda config: 1
    cold_start_by_bias: bool = False
    sections: tuple = ()
    times: Callable[[Any], bool] = lambda config: False

    @property
    def implicit(self) -> bool:
        return self.feedback == IMPLICIT

    def model_info(self, **fields: Any) -> dict:
        """An export's ``model`` section: this family's kind, feedback and scoring rule, then ``fields``."""
        return {"kind": self.name, "feedback": self.feedback, "scoring": self.scoring, **fields}


class Builder(Protocol):
    """What the training loop is handed to get its family (``jaxcf.families``, the registry, is one): it
    never imports a family itself."""

    def load_data(self, config: Any) -> Any:
        """The dataset the config names, with what its family reads (e.g. timestamps)."""

    def prepare(self, config: Any, dataset: Any) -> Any:
        """The data the config's family learns from (e.g. interactions from ratings)."""

    def build(self, config: Any, dataset: Any, layout: Any = None, orders: Any = None) -> Family:
        """The config's family on the prepared dataset."""

    def load(self, name: Any, overrides: Any = ()) -> Any:
        """A validated config from a YAML file (a saved run's, on resume)."""

    def from_dict(self, raw: Any) -> Any:
        """A validated config from plain data (the one a checkpoint was saved with)."""

    def resolve(self, config: Any) -> Spec:
        """The config's family's spec."""
