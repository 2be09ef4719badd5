"""The CPU deadlock of batched LAPACK kernels, reproduced with jax and numpy alone, and the fix.

    python bench/lapack_deadlock.py [--solver lapack|jaxcf] [--runs 5] [--calls 300] [--timeout 60]

Each run is a child process that calls one jitted function ``--calls`` times. The function has four
independent branches, each like one side of a Gibbs sweep: a gamma draw (a rejection sampler, so an
XLA while loop), a batched Cholesky factorisation of 1,000 20x20 matrices, and three batched
triangular solves. With ``--solver lapack`` they are ``jnp.linalg.cholesky`` and
``jax.scipy.linalg.solve_triangular``, which jaxlib runs on CPU as ``lapack_spotrf_ffi`` /
``lapack_strsm_ffi`` custom calls; with ``--solver jaxcf`` they are ``jaxcf.core.linalg``'s plain XLA ops.

Why the first hangs: XLA:CPU runs an asynchronous while loop's continuation, and independent thunks,
on the workers of its intra-op pool (``tf_XLAEigen``, one per core). A batched LAPACK FFI kernel cuts
its batch into tasks for that same pool (``jax::ParallelBatchMap``) and waits on a
``BlockingCounter``. Once two such kernels run at the same time on a 2-core machine, both workers
wait for tasks that only a free worker could run: every thread sleeps in a futex, 0% CPU, forever.
``gdb -p PID -batch -ex "thread apply all bt"`` shows both ``tf_XLAEigen`` threads in
``ParallelBatchMap`` under ``lapack_spotrf_ffi`` or ``lapack_strsm_ffi``.

A run that makes no progress for ``--timeout`` seconds is killed and counted as hung. Prints one line
per run and writes ``results/lapack_deadlock-<solver>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402

CHILD = r"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
solver, calls = sys.argv[1], int(sys.argv[2])
B, F, BRANCHES = 1000, 20, 4
if solver == "jaxcf":
    from jaxcf.core import linalg
    chol_fn = linalg.cholesky
    def solves(chol, r):
        return linalg.cho_solve(chol, r) + linalg.solve_lower_transpose(chol, r)
else:
    chol_fn = jnp.linalg.cholesky
    def solves(chol, r):
        mean = jax.scipy.linalg.cho_solve((chol, True), r[..., None])[..., 0]
        noise = jax.scipy.linalg.solve_triangular(chol, r[..., None], lower=True, trans=1)[..., 0]
        return mean + noise

def branch(key, a, r):
    g = jax.random.gamma(key, jnp.full((F,), 3.0))
    return solves(chol_fn(a + jnp.diag(g)[None]), r)

@jax.jit
def f(key, a, r):
    keys = jax.random.split(key, BRANCHES)
    return [branch(keys[b], a * (1 + b), r) for b in range(BRANCHES)]

rng = np.random.default_rng(0)
x = rng.normal(size=(B, F, F)).astype(np.float32)
a = jnp.asarray(x @ x.transpose(0, 2, 1) + F * np.eye(F, dtype=np.float32))
r = jnp.asarray(rng.normal(size=(B, F)).astype(np.float32))
for call in range(calls):
    jax.block_until_ready(f(jax.random.key(call), a, r))
    print(call + 1, flush=True)
"""


def run_child(solver: str, calls: int, timeout: float) -> dict:
    """One child process; returns how many calls it finished and whether it hung."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, solver, str(calls)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    done, last_progress, start = 0, time.monotonic(), time.monotonic()
    os.set_blocking(proc.stdout.fileno(), False)
    while proc.poll() is None:
        line = proc.stdout.readline()
        if line:
            done = int(line)
            last_progress = time.monotonic()
            continue
        if time.monotonic() - last_progress > timeout:
            proc.kill()
            proc.wait()
            return {"calls_done": done, "hung": True, "seconds": time.monotonic() - start}
        time.sleep(0.05)
    for line in proc.stdout.read().splitlines():
        done = int(line)
    return {"calls_done": done, "hung": proc.returncode != 0 or done < calls, "returncode": proc.returncode,
            "seconds": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", choices=("lapack", "jaxcf"), default="lapack")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without progress that count as a hang")
    args = parser.parse_args()
    runs = []
    for number in range(1, args.runs + 1):
        result = run_child(args.solver, args.calls, args.timeout)
        runs.append(result)
        state = "HUNG" if result["hung"] else "finished"
        print(f"run {number}: {state} after {result['calls_done']}/{args.calls} calls, {result['seconds']:.1f}s",
              flush=True)
    hung = sum(r["hung"] for r in runs)
    print(f"{args.solver}: {hung} of {len(runs)} runs hung")
    out = Path(__file__).parents[1] / "results" / f"lapack_deadlock-{args.solver}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python bench/lapack_deadlock.py --solver {args.solver} --runs {args.runs} "
                   f"--calls {args.calls} --timeout {args.timeout:g}",
        "machine": describe("jax", "jaxlib"), "solver": args.solver, "calls": args.calls, "timeout": args.timeout,
        "runs": runs, "hung": hung,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
