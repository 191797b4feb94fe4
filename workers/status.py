"""The worker process's own HTTP endpoints: ``/metrics`` (Prometheus) and ``/health`` (the job
loop's state, for the container healthcheck), on ``METRICS_PORT``; a taken port falls back to a
free one, with a warning, so several workers on one host never crash on it."""

from __future__ import annotations

import errno
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from workers.worker import Worker

__all__ = ["serve_status"]

log = logging.getLogger("workers")


def serve_status(worker: Worker, port: int) -> ThreadingHTTPServer:
    """``/metrics`` and ``/health`` on ``port`` (0, or a taken port: a free one), in a thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/health":
                ok, detail = worker.health()
                body = json.dumps({"status": "ok" if ok else "unhealthy", **detail}).encode()
                self._reply(200 if ok else 503, "application/json", body)
            elif self.path.split("?")[0] == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest())
            else:
                self._reply(404, "application/json", b'{"status": "not found"}')

        def _reply(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port == 0:
            raise
        server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        log.warning(
            "METRICS_PORT %d is taken (another worker on this host?); serving /metrics and "
            "/health on port %d instead",
            port,
            server.server_address[1],
        )
    else:
        log.info("serving /metrics and /health on port %d", server.server_address[1])
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="status-http", daemon=True).start()
    return server
