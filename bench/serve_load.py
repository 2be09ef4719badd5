"""A bounded load on ``python -m jaxcf.serve`` over loopback: requests/s, latency percentiles, errors.

    python bench/serve_load.py [--model DIR] [--requests 400] [--concurrency 1,4,8,16] [--json PATH]

Starts the server in a subprocess on a free port (training ``configs/bias.yaml`` first into a
temporary folder when no ``--model`` is given), waits for ``/health``, then for each concurrency runs
a fixed number of requests with that many client threads, each with its own keep-alive HTTP
connection, and stops. Workloads:

- ``recommend``: ``POST /recommend {"user": <a random known user>, "k": 10}`` (batched by the server);
- ``recommend_ratings``: ``POST /recommend {"ratings": <5-30 random (item, rating) pairs>, "k": 10}``
  (a user solved on the fly: fold-in per request);
- ``predict``: ``POST /predict`` with 100 random (user, item) pairs.

Latency is measured by the client around each request (connect excluded: the connection is kept).
Prints one line per (workload, concurrency) and writes every figure to JSON. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))]


def run_load(port: int, bodies: list[tuple[str, dict]], concurrency: int) -> dict:
    """Sends ``bodies`` (path, JSON) with ``concurrency`` threads; returns the figures."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    queue = list(reversed(bodies))

    def worker():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                if not queue:
                    break
                path, body = queue.pop()
            payload = json.dumps(body)
            start = time.perf_counter()
            try:
                connection.request("POST", path, payload, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as err:
                with lock:
                    failures.append(type(err).__name__)
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = [v * 1000 for v in latencies]
    return {
        "concurrency": concurrency, "requests": len(bodies), "wall_s": wall,
        "requests_per_s": len(latencies) / wall if wall else None,
        "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else None, "mean_ms": statistics.mean(ms) if ms else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500), "errors_4xx": sum(
            v for k, v in statuses.items() if 400 <= k < 500), "connection_failures": len(failures),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="an exported model (default: train configs/bias.yaml first)")
    parser.add_argument("--requests", type=int, default=400, help="requests per (workload, concurrency)")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--workloads", default="recommend,recommend_ratings,predict")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    levels = [int(v) for v in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if model_path is None:
            model_path = Path(tmp) / "bias"
            subprocess.run([sys.executable, "-m", "jaxcf.train", "--config", "configs/bias.yaml", "--quiet",
                            "--workdir", str(model_path)], cwd=ROOT, check=True, capture_output=True)
        ids = json.loads((Path(model_path) / "model" / "ids.json").read_text()) if (
            Path(model_path) / "model").is_dir() else json.loads((Path(model_path) / "ids.json").read_text())
        port = free_port()
        log_path = Path(tmp) / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "jaxcf.serve", "--model", str(model_path), "--port",
                                       str(port)], cwd=ROOT, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    connection.request("GET", "/health")
                    health = json.loads(connection.getresponse().read())
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the server did not start:\n{log_path.read_text()[-2000:]}") from None
                    time.sleep(0.5)
            rng = random.Random(0)
            users, items = ids["users"], ids["items"]
            makers = {
                "recommend": lambda: ("/recommend", {"user": rng.choice(users), "k": 10}),
                "recommend_ratings": lambda: ("/recommend", {"k": 10, "ratings": [
                    {"item": item, "rating": rng.choice([1, 2, 3, 3.5, 4, 4.5, 5])}
                    for item in rng.sample(items, rng.randint(5, 30))]}),
                "predict": lambda: ("/predict", {"users": [rng.choice(users) for _ in range(100)],
                                                 "items": [rng.choice(items) for _ in range(100)]}),
            }
            results = []
            load_before = machine.load_average()
            for workload in workloads:
                for concurrency in levels:
                    bodies = [makers[workload]() for _ in range(args.requests)]
                    figures = {"workload": workload, **run_load(port, bodies, concurrency)}
                    results.append(figures)
                    print(f"{workload:<18} concurrency {concurrency:>2}: {figures['requests_per_s']:7.1f} req/s  "
                          f"p50 {figures['p50_ms']:6.1f} ms  p95 {figures['p95_ms']:6.1f} ms  "
                          f"p99 {figures['p99_ms']:6.1f} ms  5xx {figures['errors_5xx']}  "
                          f"4xx {figures['errors_4xx']}  failed {figures['connection_failures']}", flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        server_log_tail = log_path.read_text().splitlines()[-3:]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "health": health, "results": results,
            "server_exit_status": server.returncode, "server_log_tail": server_log_tail,
            "load_average_before": load_before, "load_average_after": machine.load_average(),
            "cpu_count": os.cpu_count(), "machine": machine.describe("jax", "jaxlib", "fastapi", "uvicorn"),
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
