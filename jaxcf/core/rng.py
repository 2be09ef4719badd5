"""Named random streams of a run: every key jaxcf draws comes from the config's seed through one of these.

``stream(seed, "order")`` is ``fold_in(key(seed), 1)``: the numbers are fixed forever (changing one
would change every seeded result), and each stream is used for one purpose only. Per-epoch keys are
``fold_in(stream, epoch)``, so a resumed run replays exactly the draws of an uninterrupted one.

What does not live here: what the draws are used for (the families, ``jaxcf.core.steps``).
"""

from __future__ import annotations

import jax

STREAMS: dict[str, int] = {
    "init": 0,  # initial parameters (gradient models), or starting factors (Gibbs)
    "order": 1,  # each epoch's order of the training rows
    "chains": 2,  # the Gibbs chains' draws
    "negatives": 3,  # sampled negatives (pairwise ranking losses)
    "folds": 4,  # fold-in draws (posterior samples of new users)
}


def stream(seed: int, name: str) -> jax.Array:
    """The key of stream ``name`` for ``seed``."""
    return jax.random.fold_in(jax.random.key(seed), STREAMS[name])
