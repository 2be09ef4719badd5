"""Several processes as one JAX program (``jax.distributed``): starting them from the config or the environment.

:func:`initialize` runs ``jax.distributed.initialize`` when the config's ``distributed:`` section, or
the environment (``JAXCF_COORDINATOR``, ``JAXCF_NUM_PROCESSES``, ``JAXCF_PROCESS_ID``), asks for more
than one process; a single process is a no-op that leaves JAX untouched.

What does not live here: the device mesh and where arrays live on it (``jaxcf.core.distributed``).
"""

from __future__ import annotations

import os

import jax

from jaxcf.core.config import DistributedConfig
from jaxcf.core.errors import ConfigError

# Environment variables read when the config's distributed section leaves a value null.
ENVIRONMENT = {
    "coordinator_address": "JAXCF_COORDINATOR",
    "num_processes": "JAXCF_NUM_PROCESSES",
    "process_id": "JAXCF_PROCESS_ID",
}


def resolve(config: DistributedConfig) -> DistributedConfig:
    """The distributed section with null values filled from the environment.

    Raises:
      ConfigError: when an environment variable that should hold an integer does not.
    """
    values = {}
    for field, variable in ENVIRONMENT.items():
        value = getattr(config, field)
        text = os.environ.get(variable, "").strip()
        if value is None and text:
            if field == "coordinator_address":
                value = text
            else:
                low = 1 if field == "num_processes" else 0
                try:
                    value = int(text)
                except ValueError:
                    value = None
                if value is None or value < low:
                    raise ConfigError(f"{variable}={text!r}: expected an integer >= {low} (distributed.{field})")
        values[field] = value
    return DistributedConfig(**values)


def num_processes(config: DistributedConfig) -> int:
    """How many processes the config (or the environment) asks for; 1 when it names none."""
    return resolve(config).num_processes or 1


def initialize(config: DistributedConfig) -> bool:
    """Starts multi-process JAX (``jax.distributed.initialize``) when more than one process is asked for.

    Call it in every process, before anything else touches JAX. A single process is a no-op and
    leaves JAX untouched.

    Returns:
      True when running as one of several processes.

    Raises:
      ConfigError: when the coordinator address or the process id is missing or out of range.
    """
    resolved = resolve(config)
    count = resolved.num_processes or 1
    if count == 1:
        return False
    if jax.distributed.is_initialized():
        if jax.process_count() != count:
            raise ConfigError(
                f"distributed.num_processes is {count}, but JAX was already started with {jax.process_count()}"
            )
        return True
    if not resolved.coordinator_address:
        raise ConfigError(
            f"distributed.num_processes is {count}: set distributed.coordinator_address (or "
            f"{ENVIRONMENT['coordinator_address']}) to host:port of process 0, e.g. 10.0.0.1:1234"
        )
    if resolved.process_id is None or not 0 <= resolved.process_id < count:
        raise ConfigError(
            f"distributed.process_id (or {ENVIRONMENT['process_id']}) must be 0..{count - 1} "
            f"for {count} processes; got {resolved.process_id!r}"
        )
    # CPU devices of different processes talk through gloo: the default in jax 0.10, but "none"
    # (no cross-process CPU collectives) in some earlier versions.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=resolved.coordinator_address,
        num_processes=count,
        process_id=resolved.process_id,
    )
    return True
