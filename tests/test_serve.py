"""``python -m jaxcf.serve`` over real HTTP on loopback: every endpoint, good and bad requests (4xx with
one line, never a 5xx, and the server keeps serving), batched concurrent requests, a clean SIGTERM."""

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import jaxcf
from jaxcf.cli import train

ROOT = Path(__file__).parents[1]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Client:
    def __init__(self, port):
        self.port = port

    def call(self, method, path, body=None, raw=None, content_type="application/json"):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        payload = raw if raw is not None else (None if body is None else json.dumps(body))
        headers = {"Content-Type": content_type} if payload is not None else {}
        connection.request(method, path, payload, headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, json.loads(data)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve") / "bias"
    assert train.main(["--config", "bias.yaml", "--workdir", str(workdir), "--quiet", "--set", "train.epochs=1",
                       "model.n_factors=8"]) == 0
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    handle = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "jaxcf.serve", "--model", str(workdir), "--port", str(port),
                             "--max-batch", "8"], cwd=ROOT, stdout=handle, stderr=handle)
    deadline = time.monotonic() + 300
    while '"event": "ready"' not in log.read_text():  # the line a script waits for
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.1)
    status, health = Client(port).call("GET", "/health")  # once "ready" is logged, the port is open
    yield {"client": Client(port), "model": jaxcf.load_model(workdir), "proc": proc, "log": log, "health": health}
    if proc.poll() is None:
        proc.kill()
    handle.close()


def test_health_names_the_model(server):
    health, model = server["health"], server["model"]
    assert health["status"] == "ok" and health["kind"] == "bias" and health["factors"] == 8
    assert (health["users"], health["items"]) == (model.num_users, model.num_items)
    assert health["sha256"] == model.metadata["files"]["weights.safetensors"]["sha256"]


def test_predict_recommend_similar_answer_as_the_library_does(server):
    client, model = server["client"], server["model"]
    status, body = client.call("POST", "/predict", {"users": [1, "15", 999999], "items": [31, 260, 31]})
    expected = model.predict([1, 15, 999999], [31, 260, 31])
    assert status == 200 and body["fallback"] == [False, False, True]
    np.testing.assert_allclose(body["ratings"], expected.ratings, rtol=0, atol=1e-6)
    status, body = client.call("POST", "/recommend", {"user": 1, "k": 5})
    ranking = model.recommend(1, k=5)
    assert status == 200 and not body["fallback"] and [i["id"] for i in body["items"]] == ranking.ids.tolist()
    assert [i["title"] for i in body["items"]] == ranking.titles
    status, body = client.call("POST", "/recommend", {"user": 999999, "k": 3})
    assert status == 200 and body["fallback"] is True and len(body["items"]) == 3
    status, body = client.call("POST", "/similar", {"item": 260, "k": 4})
    assert status == 200 and [i["id"] for i in body["items"]] == model.similar_items(260, k=4).ids.tolist()


def test_recommend_for_a_user_known_only_by_ratings(server):
    client, model = server["client"], server["model"]
    ratings = [{"item": 31, "rating": 5}, {"item": 1029, "rating": 4.5}, {"item": 42424242, "rating": 3}]
    status, body = client.call("POST", "/recommend", {"ratings": ratings, "k": 5})
    ranking, unknown = model.recommend_from_ratings([31, 1029, 42424242], [5, 4.5, 3], k=5)
    assert status == 200 and body["unknown_items"] == [42424242] == unknown
    assert [i["id"] for i in body["items"]] == ranking.ids.tolist()
    assert not {31, 1029} & {i["id"] for i in body["items"]}


@pytest.mark.parametrize("path, body, status, message", [
    ("/recommend", {"user": 1, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("/recommend", {"user": 1, "k": "10"}, 422, "k:"),
    ("/recommend", {"user": 1, "ratings": [{"item": 1, "rating": 3}]}, 422, "either 'user'"),
    ("/recommend", {}, 422, "either 'user'"),
    ("/recommend", {"user": 1, "surprise": 1}, 422, "surprise: Extra inputs are not permitted"),
    ("/recommend", {"ratings": [{"item": 31}]}, 422, "ratings.0.rating: Field required"),
    ("/recommend", {"user": 999999, "strict": True}, 404, "unknown user id 999999"),
    ("/predict", {"users": [1, 2], "items": [31]}, 422, "differ in length"),
    ("/predict", {"users": [True], "items": [31]}, 422, "users.0: must be an id"),
    ("/predict", {"users": [1.5], "items": [31]}, 422, "users.0: must be an id"),
    ("/predict", {"users": [999999], "items": [31], "strict": True}, 404, "unknown user id 999999"),
    ("/similar", {"item": 123456789}, 404, "unknown item id 123456789"),
    ("/similar", {"item": 260, "k": -1}, 422, "k:"),
    ("/similar", [260], 422, "body:"),
])
def test_bad_requests_get_a_4xx_with_one_line(server, path, body, status, message):
    got, answer = server["client"].call("POST", path, body)
    assert got == status and set(answer) == {"error"}, answer
    assert message in answer["error"] and "\n" not in answer["error"]


def test_malformed_json_wrong_content_type_and_unknown_routes(server):
    client = server["client"]
    status, answer = client.call("POST", "/predict", raw='{"users": [1,')
    assert status == 400 and answer["error"].startswith("malformed JSON")
    status, answer = client.call("POST", "/predict", raw="users=1", content_type="application/x-www-form-urlencoded")
    assert status == 415 and "Content-Type: application/json" in answer["error"]
    status, answer = client.call("GET", "/nowhere")
    assert status == 404 and answer == {"error": "GET /nowhere: Not Found"}
    assert client.call("GET", "/health")[0] == 200  # still serving


def test_concurrent_recommendations_are_batched_and_all_answered(server):
    client, model = server["client"], server["model"]
    users = model.user_ids.raw[:40].tolist()
    answers = {}

    def ask(user):
        answers[user] = client.call("POST", "/recommend", {"user": user, "k": 3})

    threads = [threading.Thread(target=ask, args=(u,)) for u in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for user in users:
        status, body = answers[user]
        assert status == 200 and [i["id"] for i in body["items"]] == model.recommend(user, k=3).ids.tolist()


def test_sigterm_stops_the_server_cleanly_and_every_request_was_logged(server):
    proc, log = server["proc"], server["log"]
    proc.send_signal(signal.SIGTERM)
    # uvicorn finishes what is in flight, runs the shutdown, then ends by the signal it got (status 143).
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines[0]["event"] == "ready" and lines[-1] == {"event": "shutdown"}
    requests = [line for line in lines if "path" in line]
    assert requests and all({"method", "path", "status", "ms"} <= set(line) for line in requests)
    assert not [line for line in requests if line["status"] >= 500]


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "jaxcf.serve", "--model", str(tmp_path), "--port", str(port)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot listen on" in done.stderr and "Traceback" not in done.stderr


WARM_PROBE = """
import logging, sys
import jax
from jaxcf.serving import server as serve
from jaxcf.serving.inference import load_model

compiles = []
class Count(logging.Handler):
    def emit(self, record):
        if "XLA compilation" in record.getMessage():
            compiles.append(record.getMessage())
logging.getLogger("jax").addHandler(Count())
model = load_model(sys.argv[1])
if sys.argv[2] == "warm":
    serve.warm_up(model, max_batch=8)
users, items = model.user_ids.raw.tolist(), model.item_ids.raw.tolist()
with jax.log_compiles():
    model.predict(users[:3], items[:3])                     # a few pairs
    model.predict([users[0], 10**9], items[5:7])            # one unknown user: the fallback tables
    model.predict(users[:1], items[:300])                   # past the smallest shape
    for size in (1, 3, 8):                                  # the server's recommendation batches
        model.recommend_many(users[:size], k=5)
    model.similar_items(items[3], k=3)
    model.recommend_from_ratings(items[:4], [5.0, 4.0, 4.5, 1.0], k=10)
print(len(compiles))
"""


@pytest.mark.parametrize("config", ["bias.yaml", "ials.yaml"])
def test_warm_up_compiles_what_the_first_requests_use(tmp_path, config):
    """After ``warm_up`` the first request to every route compiles nothing (no 100 ms first answer), for a
    rating model and an implicit one (whose fold-in solves only ratings at its threshold: the warm-up must
    use such ratings); without it the same requests do compile, so the count below can fail."""
    workdir = tmp_path / "model"
    assert train.main(["--config", config, "--workdir", str(workdir), "--quiet", "--set", "train.epochs=1",
                       "model.n_factors=8"]) == 0
    counts = {}
    for mode in ("cold", "warm"):
        done = subprocess.run([sys.executable, "-c", WARM_PROBE, str(workdir), mode], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        counts[mode] = int(done.stdout.split()[-1])
    assert counts["cold"] > 0 and counts["warm"] == 0, counts
