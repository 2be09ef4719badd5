"""The model families and their registry: ``model.kind`` -> the family's :class:`jaxcf.core.family.Spec`.

==========  ===========  ===============================================================================
kind        feedback     the family
==========  ===========  ===============================================================================
``bias``    explicit     the notebook's ``EmbeddingDotProdBias``, by a gradient optimizer (``sgd``)
``dot``     explicit     the notebook's ``EmbeddingDotProd``, by a gradient optimizer (``sgd``)
``bpmf``    explicit     Bayesian matrix factorisation by Gibbs sampling (``bpmf``)
``bfm``     explicit     Bayesian factorisation machine (ids, SVD++ and flipped sets) by Gibbs (``bfm``)
``ials``    implicit     implicit alternating least squares (``ials``)
``bpr``     implicit     Bayesian personalised ranking (``bpr``)
``ease``    implicit     EASE, closed form (``ease``)
``blend``   implicit     EASE and iALS blended (``blend``)
==========  ===========  ===============================================================================

Everything outside this folder asks the registry, never a family by name: which sections a config has
(:data:`Config`, assembled from the core sections and the families'), whether a config is valid
(:func:`validate`), how to prepare its data (:func:`prepare`), which family trains it (:func:`build`),
and which family answers for an export (:func:`for_export`). Each family is a package with two halves:
``__init__`` (its :class:`Spec`: config checks, fold-in maths; light, importable by serving) and
``fit`` (init, epoch, record for the loop; imported only when a run is built).

Configs written before ``model.kind: bpmf`` (``model.kind: dot`` with ``ensemble.method: gibbs``) and
exports written before kinds named families (format 2) still load, translated with a one-line notice.

What does not live here: the loop (``jaxcf.training.loop``), the core sections (``jaxcf.core.config``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxcf.core import config as core
from jaxcf.core.configfile import apply_overrides, suggest
from jaxcf.core.errors import ConfigError, ModelError
from jaxcf.core.family import Family, Spec
from jaxcf.families import _sections, bfm, blend, bpmf, bpr, ease, ials, sgd

log = logging.getLogger("jaxcf")

SPECS: dict[str, Spec] = {spec.name: spec for spec in (sgd.BIAS, sgd.DOT, bpmf.SPEC, bfm.SPEC, ials.SPEC, bpr.SPEC,
                                                        ease.SPEC, blend.SPEC)}
# The sections every config has beyond the core ones: the shared ones, then each family's own.
SECTIONS = tuple(dict.fromkeys((*_sections.SECTIONS, *(s for spec in SPECS.values() for s in spec.sections))))
Config = core.assemble(SECTIONS)
Config.__doc__ = ("A whole experiment config: ``seed``, the core sections (data, optim, train, checkpoint, mesh, "
                  "distributed) and the families' (model, ensemble, implicit). Frozen; build it with "
                  "``jaxcf.config.load`` or by keyword.")


def spec(kind: str) -> Spec:
    """The family registered as ``kind``.

    Raises:
      ConfigError: for an unknown kind (with a "did you mean").
    """
    found = SPECS.get(kind)
    if found is None:
        raise ConfigError(f"model.kind: unknown value {kind!r}{suggest(str(kind), list(SPECS))}; allowed: "
                          f"{', '.join(SPECS)}")
    return found


def resolve(config) -> Spec:
    """The family that trains ``config``."""
    return spec(config.model.kind)


def validate(config):
    """Checks a whole config: the core sections, the shared ones, then the family's own rules.

    Raises:
      ConfigError: naming the first offending key and what is allowed.
    """
    family = resolve(config)
    core.validate_core(config, members=max(1, family.members(config)))
    _sections.validate(config)
    if not family.mesh and config.mesh.data * config.mesh.model > 1:
        raise ConfigError(f"model.kind {family.name} trains on one device: set mesh.data and mesh.model to 1")
    family.validate(config)
    return config


def translate(raw: Mapping[str, Any]) -> dict:
    """A config's plain data with names from before the registry translated, each with a one-line notice:
    ``model.kind: dot`` with ``ensemble.method: gibbs`` is ``model.kind: bpmf``."""
    raw = dict(raw)
    model, ensemble = raw.get("model"), raw.get("ensemble")
    if isinstance(ensemble, Mapping) and ensemble.get("method") == "gibbs":
        kind = model.get("kind", "bias") if isinstance(model, Mapping) else "bias"
        if kind != "dot":
            raise ConfigError(f"ensemble.method gibbs samples a dot model (BPMF); set model.kind: bpmf (got "
                              f"model.kind {kind!r})")
        log.warning("note: model.kind dot with ensemble.method gibbs is model.kind bpmf now; read as such")
        raw["model"] = {**model, "kind": "bpmf"}
        raw["ensemble"] = {key: value for key, value in ensemble.items() if key != "method"}
    return raw


def from_dict(raw: Mapping[str, Any] | None):
    """A validated :data:`Config` from nested plain data (as YAML gives it; old names translated)."""
    return core.from_dict(translate(raw or {}), Config, validate)


def load(name: str | Path | None = None, overrides: Sequence[str] = ()):
    """Loads a config file (a path or a shipped name; None: the defaults) with ``--set`` overrides.

    Raises:
      ConfigError: for any unusable file, key or value.
    """
    return from_dict(core.read(name, overrides))


def replace(config, overrides: Sequence[str]):
    """``config`` with ``--set`` overrides applied (validated again)."""
    return from_dict(apply_overrides(core.to_dict(config), overrides))


def export_kind(model_info: Mapping[str, Any]) -> str:
    """The family of an export's ``model`` section: its ``kind``; for an export of format 2, where
    implicit families were ``kind: dot`` with a ``family`` and BPMF ``kind: dot`` with
    ``ensemble_method: gibbs``, translated."""
    if "scoring" in model_info:
        return model_info["kind"]
    if model_info.get("family"):
        return model_info["family"]
    if model_info.get("ensemble_method") == "gibbs":
        return "bpmf"
    return model_info.get("kind")


def export_scoring(model_info: Mapping[str, Any]) -> str:
    """An export's scoring rule (``jaxcf.core.family.PRODUCT`` or ``SIGMOID``): its ``scoring``, or for an
    export of format 2 its family's."""
    if "scoring" in model_info:
        return model_info["scoring"]
    kind = export_kind(model_info)
    return SPECS[kind].scoring if kind in SPECS else model_info.get("kind")


def for_export(model_info: Mapping[str, Any]) -> Spec:
    """The family that answers for an export.

    Raises:
      ModelError: an export of a kind this jaxcf does not know.
    """
    kind = export_kind(model_info)
    if kind not in SPECS:
        raise ModelError(f"the export is of model kind {kind!r}, which this jaxcf does not know; use the jaxcf that "
                         "wrote it")
    return SPECS[kind]


def load_data(config):
    """The dataset ``config.data`` names, with the timestamps its family reads."""
    from jaxcf.data import load

    return load(config.data, config.seed, timestamps=resolve(config).times(config))


def prepare(config, dataset):
    """The data a family learns from: the ratings, or for an implicit-feedback family its interactions
    (ratings of at least ``data.implicit_threshold``; ``jaxcf.data.implicit``)."""
    if resolve(config).implicit and dataset.implicit_threshold is None:
        from jaxcf.data.implicit import from_config

        return from_config(dataset, config.data, config.seed)
    return dataset


def build(config, dataset, layout=None, orders=None) -> Family:
    """The fit half of the family that trains ``config``, on ``dataset`` (prepared), on one device or a mesh."""
    return resolve(config).build(config, dataset, layout, orders)


__all__ = ["SPECS", "Config", "Spec", "build", "export_kind", "for_export", "from_dict", "load", "load_data", "prepare",
           "replace", "resolve", "spec", "translate", "validate"]
