"""Times the embedding-gradient scatter-add, with and without the CUDA float-atomics workaround.

    python bench/scatter_add.py [--json PATH]

The gradient of an embedding lookup is a float32 scatter-add of per-rating row gradients into the
table: ``zeros([9066, 50]).at[ids].add(grads)`` for the notebook's item table. jaxlib 0.10.2 to 0.11.0
compile a float32 scatter-add on CUDA to a compare-and-swap retry loop instead of the native atomic
add (jax-ml/jax#38806, openxla/xla#46225; an LLVM NVPTX change), which collapses when many updates
hit the same rows, as popular items do. ``XLA_FLAGS=--xla_backend_extra_options=-nvptx-allow-ftz-atomics``
restores the native atomic (which flushes float32 subnormals to zero, as jaxlib <= 0.10.1 did).

XLA reads ``XLA_FLAGS`` once per process, so each setting is timed in its own child process. Cases:
the notebook's batch (64 ids), a large batch with popular ids (65,536 Zipf-distributed ids), and
the worst case (65,536 copies of one id). On a CPU the flag changes nothing (it is an NVPTX option);
the CPU figures show the cost of XLA's CPU scatter instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (bench/ is not a package; the scripts run as files)

FLAG = "--xla_backend_extra_options=-nvptx-allow-ftz-atomics"
ROWS, WIDTH = 9066, 50
SCATTERS_PER_CALL = 50  # inside one jitted loop, so dispatch does not dominate the small cases


def ids_for(case: str, rng):
    """int32 ids of one case."""
    import numpy as np

    if case == "notebook batch 64, uniform ids":
        return rng.integers(0, ROWS, 64).astype(np.int32)
    if case == "batch 65536, Zipf ids":
        return np.minimum(rng.zipf(1.2, 65_536) - 1, ROWS - 1).astype(np.int32)
    return np.zeros(65_536, np.int32)  # one id


CASES = ("notebook batch 64, uniform ids", "batch 65536, Zipf ids", "batch 65536, one id")


def measure(repeats: int) -> dict:
    """Microseconds per scatter-add, median over ``repeats`` calls of ``SCATTERS_PER_CALL`` scatters."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def scatter_many(table, ids, grads):
        def body(k, table):
            # Depends on k so that XLA cannot hoist or merge the scatters.
            return table.at[ids].add(grads * (k + 1).astype(grads.dtype))

        return jax.lax.fori_loop(0, SCATTERS_PER_CALL, body, table)

    rng = np.random.default_rng(0)
    out = {"device": machine.jax_device(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    for case in CASES:
        ids = jnp.asarray(ids_for(case, rng))
        grads = jnp.asarray(rng.normal(size=(ids.shape[0], WIDTH)).astype(np.float32) * 1e-3)
        table = jnp.zeros((ROWS, WIDTH), jnp.float32)
        jax.block_until_ready(scatter_many(table, ids, grads))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(scatter_many(table, ids, grads))
            times.append((time.perf_counter() - start) / SCATTERS_PER_CALL * 1e6)
        out[case] = {"us_per_scatter": float(np.median(times)), "num_ids": int(ids.shape[0])}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.json.write_text(json.dumps(measure(args.repeats)))
        return 0
    base = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "nvptx-allow-ftz-atomics" not in f)
    runs = {}
    for name, flags in (("default", base), ("ftz_atomics", f"{base} {FLAG}".strip())):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats), "--json", str(out)]
            done = subprocess.run(cmd, env=env)
            if done.returncode != 0:
                print(f"error: the {name} run failed (exit {done.returncode})", file=sys.stderr)
                return 1
            runs[name] = json.loads(out.read_text())
    print(f"{'case':34s} {'default us':>11s} {'ftz-atomics us':>15s}   ({runs['default']['device']})")
    for case in CASES:
        a, b = runs["default"][case]["us_per_scatter"], runs["ftz_atomics"][case]["us_per_scatter"]
        print(f"{case:34s} {a:11.1f} {b:15.1f}")
    if args.json:
        result = {"benchmark": "scatter_add", "command": " ".join(["python", *sys.argv]), "flag": FLAG, "runs": runs,
                  "machine": machine.describe("jax", "jaxlib"), "load_average": machine.load_average()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
