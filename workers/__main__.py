"""``python -m workers``: one worker process (one job at a time); SIGTERM stops it gracefully."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from prometheus_client import start_http_server

from app.queue import Queue
from app.settings import get_settings
from workers.worker import Worker


def main() -> int:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    queue = Queue.from_settings(settings)
    worker = Worker(queue, settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="0.0.0.0")

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if worker.stopping:
            logging.getLogger("workers").warning("second signal: exiting now")
            raise SystemExit(1)
        logging.getLogger("workers").info("signal %d: stopping after handing back the job", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
