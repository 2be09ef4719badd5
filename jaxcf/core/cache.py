"""Compile once: JAX's persistent compilation cache, so that a second run of a config (or ``predict`` and
``recommend`` on the same model) in a new process compiles nothing.

The CLIs turn it on in their ``main()``; from Python it is one call, ``jaxcf.enable_compilation_cache()``
(it sets process-wide JAX flags, so no library function calls it for you). One switch turns it off
everywhere: the environment variable ``JAXCF_COMPILATION_CACHE=off`` (or ``0``); set to a path, it moves
the cache there.

The cache holds compiled programs only (XLA executables keyed by the program, the JAX version and the
device), never data. It is trusted code: anyone who can write to its folder can make this process run
their code (JAX's documentation says so). So it lives in a folder private to the user, by default
``$XDG_CACHE_HOME/jaxcf/xla`` (``~/.cache/jaxcf/xla``), created with mode 0700; a folder that another
user owns, or that others may write to, is refused (the cache stays off and a warning says why).

What does not live here: anything that compiles (every jitted function uses the cache once it is on).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

ENV = "JAXCF_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no", "none")
log = logging.getLogger("jaxcf.core.cache")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxcf" / "xla"


def private_dir(path: Path) -> str | None:
    """Creates ``path`` (mode 0700) if needed; returns why it cannot hold a trusted cache, or None."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = os.stat(path)
    except OSError as err:
        return f"cannot create {path} ({err.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a folder"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"{path} belongs to another user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} may be written by other users (mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it"
    return None


def enable_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Turns JAX's persistent compilation cache on for this process (see the module docstring).

    Args:
      path: the cache folder; default ``$JAXCF_COMPILATION_CACHE`` when set to a path, else
        ``~/.cache/jaxcf/xla``.

    Returns:
      The folder in use, or None when the cache is off (``JAXCF_COMPILATION_CACHE=off``, or a folder that
      is not private: a warning says why).
    """
    import jax

    setting = os.environ.get(ENV, "").strip()
    if path is None and setting.lower() in OFF and setting:
        return None
    target = Path(path if path is not None else (setting or default_dir())).expanduser()
    problem = private_dir(target)
    if problem:
        log.warning("compilation cache off: %s", problem)
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    # Cache every program, however fast it compiled: a CLI's start-up is many small compiles.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return target
