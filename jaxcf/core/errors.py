"""The errors jaxcf raises for things a user can fix, each with a one-line message meant for the user.

A CLI turns any :class:`JaxcfError` into ``error: <message>`` on stderr and an exit status
(:data:`EXIT_STATUS`): 2 for bad input (a config, data, a model folder, a workdir, a checkpoint),
1 for a run that diverged, 3 for one that stalled. The Python API raises them as they are.

What does not live here: where each is raised (the modules named in each docstring).
"""

from __future__ import annotations


class JaxcfError(Exception):
    """Base class: something the user can act on; ``str(err)`` is one line saying what and what to do."""


class ConfigError(JaxcfError, ValueError):
    """A configuration that cannot be used (``jaxcf.core.config``)."""


class DataError(JaxcfError, ValueError):
    """Data that cannot be used (``jaxcf.data``)."""


class ModelError(JaxcfError, ValueError):
    """An exported model that cannot be used, or a request it cannot answer (``jaxcf.serving``)."""


class UnknownIdError(ModelError):
    """A raw user or item id that the model was not trained on (strict mode, or similar_items)."""


class WorkdirError(JaxcfError, ValueError):
    """A workdir that cannot be used as asked (``jaxcf.training.workdir``)."""


class CheckpointError(JaxcfError, ValueError):
    """A checkpoint that cannot be written or restored (``jaxcf.training.checkpoint``)."""


class TrainingDiverged(JaxcfError, RuntimeError):
    """The loss, the parameters or the validation metrics became NaN, infinite or absurd (``jaxcf.training.loop``)."""


class TrainingStalled(JaxcfError, RuntimeError):
    """An epoch made no progress for longer than ``train.stall_seconds`` allows (``jaxcf.training.workdir``)."""


# Exit status of a CLI for each kind of error; any other JaxcfError is bad input (2).
EXIT_STATUS: dict[type, int] = {TrainingDiverged: 1, TrainingStalled: 3}


def exit_status(err: JaxcfError) -> int:
    """The CLI exit status for ``err``: 1 diverged, 3 stalled, 2 bad input."""
    for kind, status in EXIT_STATUS.items():
        if isinstance(err, kind):
            return status
    return 2
