"""Weight exchange with jaxcf through safetensors (no pickles), by table name.

jaxcf exports ``WORKDIR/model/weights.safetensors`` with these tensors; they map onto the
notebook's module attributes one to one:

=================  ===================  =======================
jaxcf name         shape                PyTorch state_dict name
=================  ===================  =======================
``user_embedding``  [n_users, F]         ``users.weight``
``item_embedding``  [n_movies, F]        ``movies.weight``
``user_bias``       [n_users, 1]         ``users_b.weight``
``item_bias``       [n_movies, 1]        ``movies_b.weight``
=================  ===================  =======================

The layouts agree (rows are ids, float32), so no transpose is involved. This module knows the names
only; it imports nothing from jaxcf. What does not live here: the models (``reference_torch.notebook``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
import torch
import torch.nn as nn

JAXCF_TO_TORCH = {
    "user_embedding": "users.weight",
    "item_embedding": "movies.weight",
    "user_bias": "users_b.weight",
    "item_bias": "movies_b.weight",
}
TORCH_TO_JAXCF = {v: k for k, v in JAXCF_TO_TORCH.items()}


class WeightsError(ValueError):
    """Weights that do not fit the model; the message is one line meant for the user."""


def to_jaxcf_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's tables under jaxcf's names, as float32 numpy copies on the host.

    Returns:
      ``{jaxcf name: float32[rows, cols]}``, two tables for the dot model, four for the biased one.
    """
    state = model.state_dict()
    unknown = sorted(set(state) - set(TORCH_TO_JAXCF))
    if unknown:
        raise WeightsError(f"the model has parameters with no jaxcf name: {', '.join(unknown)}")
    return {TORCH_TO_JAXCF[k]: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in state.items()}


def load_jaxcf_arrays(
    model: nn.Module, arrays: Mapping[str, np.ndarray | torch.Tensor], source: str = "weights"
) -> None:
    """Copies tables named as jaxcf names them into the model, in place.

    Args:
      model: an ``EmbeddingDotProd`` or ``EmbeddingDotProdBias``.
      arrays: ``{jaxcf name: [rows, cols]}``, exactly the model's tables.
      source: how to name the weights in error messages (e.g. the file path).

    Raises:
      WeightsError: a missing or extra table, a shape mismatch, or a non-float table.
    """
    expected = {TORCH_TO_JAXCF[k]: tuple(v.shape) for k, v in model.state_dict().items() if k in TORCH_TO_JAXCF}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    kind = type(model).__name__
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing)}")
        if extra:
            parts.append(f"has {', '.join(extra)} which {kind} does not")
        raise WeightsError(f"{source}: {' and '.join(parts)}; weights of the dot model fit only --model dot, "
                           "those of the biased model only --model bias")
    tensors = {}
    for name, shape in expected.items():
        value = arrays[name]
        value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        if tuple(value.shape) != shape:
            raise WeightsError(
                f"{source}: {name} has shape {list(value.shape)} but {kind} expects {list(shape)}; "
                "were the weights trained on another dataset or n_factors?"
            )
        if not value.dtype.is_floating_point:
            raise WeightsError(f"{source}: {name} has dtype {value.dtype}; expected floating point")
        tensors[JAXCF_TO_TORCH[name]] = value.to(torch.float32)
    model.load_state_dict(tensors, strict=True)


def load_jaxcf_weights(model: nn.Module, path: str | Path) -> None:
    """Loads jaxcf's ``weights.safetensors`` (e.g. ``WORKDIR/model/weights.safetensors``) into the model.

    Raises:
      WeightsError: the file is missing, not safetensors, or does not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file; expected WORKDIR/model/weights.safetensors from jaxcf")
    try:
        arrays = safetensors.numpy.load_file(str(path))
    except (OSError, safetensors.SafetensorError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    load_jaxcf_arrays(model, arrays, source=str(path))


def save_jaxcf_weights(model: nn.Module, path: str | Path) -> Path:
    """Writes the model's tables under jaxcf's names as safetensors, atomically (temp file, then rename).

    Returns:
      The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = safetensors.numpy.save(to_jaxcf_arrays(model), metadata={"format": "reference_torch"})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
