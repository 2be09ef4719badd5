"""What a benchmark figure was measured on: CPU model, cores, load average, versions, device.

Shared by the scripts in ``bench/``; nothing here measures anything. What does not live here: the
benchmarks themselves (``bench/vs_torch.py``, ``bench/scale.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """``lscpu``'s "Model name" (falls back to /proc/cpuinfo, then to ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (``uptime``): other work on the machine skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def versions(*packages: str) -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def jax_device() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {getattr(device, 'device_kind', '')} x{jax.device_count()}"


def describe(*packages: str) -> dict:
    """The machine description stored with every benchmark result."""
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions(*packages),
    }


def write_json(path: Path, record: dict, load_before: list[float] | None, *packages: str) -> None:
    """Writes one benchmark's ``record`` to ``path`` (its folder made first) with the load average
    before (measured by the caller) and now, and the machine (:func:`describe` with ``packages``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**record, "load_average_before": load_before, "load_average_after": load_average(),
              "machine": describe(*packages)}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
