"""Whether a run fits in memory, checked before any work: a size typed by mistake (``model.n_factors=1e8``,
``ensemble.size`` in the millions) is one line, not a process killed by the kernel minutes later.

The training state's size is known without allocating it (``jax.eval_shape`` of a family's ``init``); a
run holds about :data:`STATE_COPIES` times it at its peak (the state, its update before the old buffers
are donated back, the optimizer's temporaries). That is compared with the memory the device has free:
``MemAvailable`` of ``/proc/meminfo`` for the CPU (host RAM), the allocator's limit minus what is in use
for an accelerator. Where neither can be read, nothing is refused.

What does not live here: the config's own bounds (``jaxcf.core.config``), the families.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxcf.core.errors import ConfigError

STATE_COPIES = 3


def available_bytes(device=None) -> int | None:
    """Free memory of ``device`` (default: the first), or None when it cannot be read."""
    device = device if device is not None else jax.devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        except (KeyError, TypeError, ValueError, RuntimeError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
               if hasattr(leaf, "shape"))


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1000
    return f"{nbytes:.3g} TB"


def check(needed: int, what: str, hint: str, shards: int = 1) -> None:
    """Refuses work that needs more than the device has free.

    Args:
      needed: bytes the work needs at its peak.
      what: what needs them, for the message ("the training state").
      hint: what to change ("lower model.n_factors").
      shards: devices the bytes are spread over (a mesh's model axis).

    Raises:
      ConfigError: one line naming both sizes and the hint.
    """
    free = available_bytes()
    per_device = needed / max(1, shards)
    if free is not None and per_device > free:
        raise ConfigError(f"{what} needs about {human(per_device)}{' per device' if shards > 1 else ''}, more than the "
                          f"{human(free)} free; {hint}")


def check_state(init: Callable[[], Any], hint: str, shards: int = 1) -> int:
    """:func:`check` for a training state built by ``init`` (never called: only its shapes are traced).

    Returns:
      The state's bytes.
    """
    nbytes = tree_bytes(jax.eval_shape(init))
    check(STATE_COPIES * nbytes, f"the training state ({human(nbytes)}, about {STATE_COPIES}x at its peak)", hint,
          shards)
    return nbytes
