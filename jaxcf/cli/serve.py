"""``python -m jaxcf.serve``: a trained model over HTTP (FastAPI on uvicorn), loaded once
(``jaxcf.serving.server``: the routes, batching, the access log and the warm-up).

    python -m jaxcf.serve --model runs/bias [--host 127.0.0.1] [--port 8000] [--batch-window-ms 2]
                          [--max-batch 64] [--no-warm-up]

It logs ``{"event": "ready", ...}`` once the port is open (after the warm-up compiled what requests use),
then one JSON line per request on stderr; SIGTERM and SIGINT stop it gracefully. Bad arguments are one
line and exit status 2.

What does not live here: the application (``jaxcf.serving.server``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import sys
from collections.abc import Sequence

from jaxcf.cli import common as cli
from jaxcf.core.errors import ModelError
from jaxcf.serving.server import MAX_BATCH, MAX_WINDOW_MS, create_app, log, warm_up


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training workdir or an exported model folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--batch-window-ms", type=float, default=2.0,
                        help="how long a recommendation waits for others to share its batch (default 2)")
    parser.add_argument("--max-batch", type=int, default=64, help="recommendations per batch at most (default 64)")
    parser.add_argument("--no-warm-up", action="store_true", help="open the port before compiling")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The access log and events, one JSON line each, on stderr; other libraries' loggers stay quiet.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    def body() -> int:
        try:
            import uvicorn
        except ImportError:
            raise ModelError("the server needs FastAPI and uvicorn: pip install 'jaxcf[serve]'") from None
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1-65535; got {args.port}")
        if not 1 <= args.max_batch <= MAX_BATCH:
            raise ValueError(f"--max-batch must be in 1-{MAX_BATCH}; got {args.max_batch}")
        if not (math.isfinite(args.batch_window_ms) and 0 <= args.batch_window_ms <= MAX_WINDOW_MS):
            raise ValueError(f"--batch-window-ms must be a number in [0, {MAX_WINDOW_MS}]; got {args.batch_window_ms}")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((args.host, args.port))
            except OSError as err:
                raise ValueError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); choose another "
                                 "--port or --host") from None
        model = cli.load_model(args.model)
        seconds = 0.0 if args.no_warm_up else warm_up(model, args.max_batch)
        ready = {"event": "ready", "model": str(model.path), "kind": model.kind, "users": model.num_users,
                 "items": model.num_items, "warm_up_s": round(seconds, 2), "url": f"http://{args.host}:{args.port}"}

        class Server(uvicorn.Server):
            async def startup(self, sockets=None):
                await super().startup(sockets=sockets)
                if self.started:  # the port is open: a client that waits for this line can connect
                    log.info(json.dumps(ready))

        app = create_app(model, batch_window=args.batch_window_ms / 1000, max_batch=args.max_batch)
        Server(uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                              timeout_graceful_shutdown=30)).run()
        return 0

    return cli.run(body)
