"""``python -m jaxcf.serve``: a trained model over HTTP (FastAPI on uvicorn), loaded once.

    python -m jaxcf.serve --model runs/bias [--host 127.0.0.1] [--port 8000]

========================  ========================================================================
``GET /health``           ``{"status": "ok", "kind", "feedback", "users", "items", "factors", "members", "sha256"}``
``POST /predict``         ``{"users": [...], "items": [...], "strict": false}`` ->
                          ``{"ratings": [...], "fallback": [...]}`` (an implicit-feedback model:
                          ``{"scores": [...], "fallback": [...]}``, scores that order items)
``POST /recommend``       ``{"user": id, "k": 10}``, or ``{"ratings": [{"item": id, "rating": r}, ...],
                          "k": 10}`` for a user known only by these ratings (solved on the fly:
                          ``Model.recommend_from_ratings``; the rated items are left out) ->
                          ``{"items": [{"id", "title", "score"}, ...], "fallback": bool}``
``POST /similar``         ``{"item": id, "k": 10}`` -> ``{"items": [...]}``
========================  ========================================================================

Bad requests (malformed JSON, wrong types, ``k`` <= 0, lengths that differ, unknown ids under
``"strict": true``) get a 4xx with ``{"error": "one clear line"}``, never a 500, and the server keeps
serving. Recommendations for known users are batched: requests arriving within a few milliseconds
of each other are answered by one ``Model.recommend_many`` call (one compiled top-k over the whole
catalogue for the block), run in a worker thread so the event loop keeps accepting. Every request is
logged as one JSON line (method, path, status, milliseconds). SIGTERM and SIGINT stop it gracefully:
no new connections, in-flight requests finished. The compiled shapes are warmed up before the port
opens, so the first requests are not slow.

One concept at some length: the HTTP application (its routes, batching, errors and warm-up).

What does not live here: the model (``jaxcf.serving.inference``), the load test (``bench/serve_load.py``).
"""


import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np

from jaxcf.core import scoring
from jaxcf.core.errors import ModelError, UnknownIdError
from jaxcf.serving.inference import Model

log = logging.getLogger("jaxcf.serving.server")
MAX_PAIRS = 100_000  # pairs per /predict request
MAX_K = 1000
PREDICT_WARM_PAIRS = 8192  # /predict sizes compiled before the port opens
MAX_RATINGS = 10_000  # ratings per on-the-fly fold-in
MAX_BATCH = 4096  # recommendations per batched device call at most (--max-batch)
MAX_WINDOW_MS = 1000.0  # the longest a recommendation may wait for others to share its batch


class Batcher:
    """Collects calls that arrive within ``window`` seconds (at most ``max_size``) into one call of
    ``function(list of arguments) -> list of results``, run in a worker thread."""

    def __init__(self, function: Callable[[list], list], window: float, max_size: int):
        self.function, self.window, self.max_size = function, window, max_size
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def submit(self, argument: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((argument, future))
        return await future

    async def _run(self) -> None:
        from starlette.concurrency import run_in_threadpool

        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            try:
                results = await run_in_threadpool(self.function, [argument for argument, _ in batch])
            except Exception as err:  # noqa: BLE001 (handed to every caller of the batch)
                results = [err] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)


def create_app(model: Model, *, batch_window: float = 0.002, max_batch: int = 64):
    """The FastAPI application serving ``model``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    Id = StrictInt | StrictStr
    K = Annotated[int, Field(ge=1, le=MAX_K, strict=True)]

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class PredictRequest(Strict):
        users: Annotated[list[Id], Field(max_length=MAX_PAIRS)]
        items: Annotated[list[Id], Field(max_length=MAX_PAIRS)]
        strict: StrictBool = False

    class Rated(Strict):
        item: Id
        rating: StrictFloat | StrictInt

    class RecommendRequest(Strict):
        user: Id | None = None
        ratings: Annotated[list[Rated], Field(max_length=MAX_RATINGS)] | None = None
        k: K = 10
        strict: StrictBool = False
        exclude_seen: StrictBool = True

    class SimilarRequest(Strict):
        item: Id
        k: K = 10
        min_ratings: Annotated[int, Field(ge=0, strict=True)] = 1

    def recommend_block(requests: list[tuple[Any, int, bool]]) -> list:
        out: list = [None] * len(requests)
        for exclude in (True, False):
            positions = [p for p, (_, _, e) in enumerate(requests) if e == exclude]
            if positions:
                k = max(requests[p][1] for p in positions)
                rankings = model.recommend_many([requests[p][0] for p in positions], k=k, exclude_seen=exclude)
                for p, ranking in zip(positions, rankings):
                    out[p] = _trim(ranking, requests[p][1])
        return out

    batcher = Batcher(recommend_block, batch_window, max_batch)

    async def lifespan(app):
        batcher.start()
        yield
        log.info(json.dumps({"event": "shutdown"}))
        await batcher.stop()

    app = FastAPI(title="jaxcf", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        # A client's id that is not valid Unicode (a lone surrogate) is echoed escaped: JSON must be UTF-8.
        safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return JSONResponse({"error": safe}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if content_type and not content_type.endswith("json"):
            return error(415, f"the body is {content_type}; send JSON with 'Content-Type: application/json'")
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse the body')}")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid value")
        if loc and loc[-1] in ("int", "str", "float"):  # a branch of an id's or a rating's union of types
            what = "a number" if loc[-1] == "float" else "an id (an integer or a text)"
            loc, message = loc[:-1], f"must be {what}"
        return error(422, f"{'.'.join(loc) or 'body'}: {message}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error(err.status_code, f"{request.method} {request.url.path}: {err.detail}")

    @app.exception_handler(UnknownIdError)
    async def unknown(request: Request, err: UnknownIdError):
        return error(404, str(err))

    @app.exception_handler(ModelError)
    async def model_error(request: Request, err: ModelError):
        return error(400, str(err))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, err: ValueError):
        return error(400, (str(err).splitlines() or ["invalid request"])[0])

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        return error(500, f"internal error ({type(err).__name__}); the server keeps serving")

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        start = time.perf_counter()
        status = 500  # logged even when the handler raised: every request has its line
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            log.info(json.dumps({"method": request.method, "path": request.url.path, "status": status,
                                 "ms": round((time.perf_counter() - start) * 1000, 2),
                                 "client": request.client.host if request.client else None}))

    files = model.metadata.get("files") or {}
    weights_sha = (files.get("weights.safetensors") or {}).get("sha256")

    @app.get("/health")
    async def health():
        return {"status": "ok", "kind": model.kind, "feedback": model.feedback, "users": model.num_users,
                "items": model.num_items,
                "factors": int(model.export.weights["user_embedding"].shape[-1]), "members": model.ensemble_size,
                "sha256": weights_sha}

    @app.post("/predict")
    async def predict(body: PredictRequest):
        if len(body.users) != len(body.items):
            return error(422, f"users and items differ in length ({len(body.users)} and {len(body.items)}); "
                              "give one item per user")
        result = await run_in_threadpool(model.predict, body.users, body.items, body.strict)
        key = "scores" if model.feedback == "implicit" else "ratings"
        return {key: [float(v) for v in result.ratings], "fallback": [bool(v) for v in result.fallback]}

    @app.post("/recommend")
    async def recommend(body: RecommendRequest):
        if (body.user is None) == (body.ratings is None):
            return error(422, "give either 'user' (an id) or 'ratings' (a list of {item, rating}), not both")
        if body.ratings is not None:
            try:
                values = [float(r.rating) for r in body.ratings]
            except OverflowError:  # an integer of hundreds of digits
                values = [math.inf]
            if not all(math.isfinite(v) for v in values):
                return error(422, "ratings must be finite numbers")
            ranking, unknown_items = await run_in_threadpool(
                model.recommend_from_ratings, [r.item for r in body.ratings], values, body.k)
            return {**_items(ranking), "fallback": False, "unknown_items": unknown_items}
        if body.strict:
            model.lookup_users([body.user], strict=True)
        ranking = await batcher.submit((body.user, body.k, body.exclude_seen))
        return {**_items(ranking), "fallback": bool(ranking.fallback)}

    @app.post("/similar")
    async def similar(body: SimilarRequest):
        ranking = await run_in_threadpool(model.similar_items, body.item, body.k, body.min_ratings)
        return _items(ranking)

    return app


def _trim(ranking, k: int):
    return ranking._replace(ids=ranking.ids[:k], titles=ranking.titles[:k], scores=ranking.scores[:k])


def _items(ranking) -> dict:
    return {"items": [{"id": raw.item() if hasattr(raw, "item") else raw, "title": title, "score": float(score)}
                      for raw, title, score in zip(ranking.ids, ranking.titles, ranking.scores)]}


def warm_up(model: Model, max_batch: int) -> float:
    """Compiles the shapes requests will use (user blocks up to ``max_batch``, k up to 16, predictions
    of up to ``PREDICT_WARM_PAIRS`` pairs, fold-in of up to 512 ratings) before the port opens.
    Returns the seconds it took."""
    start = time.perf_counter()
    users = model.user_ids.raw[: min(model.num_users, max_batch)].tolist()
    size = 1
    while size <= len(users):
        model.recommend_many(users[:size], k=10)
        size *= 2
    pairs = scoring.MIN_ROUND
    while users and model.num_items and pairs <= PREDICT_WARM_PAIRS:  # six shapes
        model.predict(users[:1], model.item_ids.raw[np.arange(pairs) % model.num_items].tolist())
        pairs *= 2
    _ = model.fallback_tables  # what an unknown id's answer reads, built once
    if model.num_items:
        model.similar_items(model.item_ids.raw[0].item() if hasattr(model.item_ids.raw[0], "item")
                            else model.item_ids.raw[0], k=10)
        trained = model.item_ids.raw[np.flatnonzero(model.item_trained)[:512]].tolist()
        value = warm_rating(model)  # a rating the solve uses (an implicit model's: an interaction)
        for count in (1, 65, 129, 257):
            model.recommend_from_ratings(trained[:count], [value] * len(trained[:count]), k=10)
    return time.perf_counter() - start


def warm_rating(model: Model) -> float:
    """A rating that fold-in uses: an implicit model's interaction threshold, else the middle of the scale."""
    from jaxcf.serving.export import implicit_threshold
    from jaxcf.serving.foldin import rating_scale

    threshold = implicit_threshold(model.metadata)
    if threshold is not None:
        return float(threshold)
    low, high = rating_scale(model.export)
    return (low + high) / 2 if math.isfinite(low + high) else 3.0
