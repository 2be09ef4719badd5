"""What every ``python -m jaxcf.<command>`` shares: errors as one line and an exit status, ranking tables.

A :class:`jaxcf.core.errors.JaxcfError` (or a ``ValueError`` from a bad argument) becomes ``error: <one
line>`` on stderr and exit status 2 for bad input, 1 for a diverged run, 3 for a stalled one; never a
traceback. What does not live here: the commands (``jaxcf.cli.train``, ``jaxcf.cli.predict``, ...).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from jaxcf.core import cache
from jaxcf.core.errors import JaxcfError, exit_status


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a notice is logged (a test's capture, a
    redirected stream), never to a stream closed since the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def run(body: Callable[[], int]) -> int:
    """Runs a command's body, turning the errors a user can fix into one line and an exit status; the
    persistent compilation cache is on for it (``jaxcf.core.cache``; ``JAXCF_COMPILATION_CACHE=off`` turns it off)."""
    cache.enable_compilation_cache()
    for stream in (sys.stdout, sys.stderr):  # an id that is not valid Unicode is shown escaped, not a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
    notices = logging.getLogger("jaxcf")  # the library's one-line notices (e.g. an old config translated)
    if not notices.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        notices.addHandler(handler)
        notices.propagate = False
    try:
        return body()
    except JaxcfError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_status(err)
    except ValueError as err:  # a bad argument value (k < 1, lengths that differ, ...)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"error: {first}", file=sys.stderr)
        return 2


def _quiet_closed_loops(hook):
    """``sys.unraisablehook`` without one kind of noise: after a checkpoint write fails (a full disk),
    tensorstore's pending callbacks reach an event loop orbax has closed, and each reports ``RuntimeError:
    Event loop is closed`` through this hook from a native thread. The failure itself is one line."""

    def unraisable(info):
        if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed":
            return
        hook(info)

    return unraisable


def load_model(path):
    """``jaxcf.load_model`` for a CLI: an export of an earlier format loads, with one line on stderr naming
    what of it no checksum covers."""
    from jaxcf.serving.inference import load_model as load

    model = load(path)
    if model.export.unverified:
        print(f"note: {model.path} is an export of format {model.metadata.get('format_version')}: nothing verifies "
              f"its {', '.join(model.export.unverified)}; save or re-export it with this jaxcf to verify them",
              file=sys.stderr)
    return model


def format_ranking(ranking, score_name: str, id_name: str = "item") -> str:
    """A plain-text table: rank, id, score, title."""
    width = max([len(id_name)] + [len(str(v)) for v in ranking.ids.tolist()])
    lines = [f"rank  {id_name:>{width}}  {score_name:>9}  title"]
    for rank, (raw, title, score) in enumerate(zip(ranking.ids.tolist(), ranking.titles, ranking.scores.tolist()), 1):
        shown = title if title is not None else "(no title)"
        lines.append(f"{rank:>4}  {str(raw):>{width}}  {score:>9.4f}  {shown}")
    return "\n".join(lines)
