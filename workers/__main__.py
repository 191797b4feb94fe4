"""``python -m workers``: one worker process (one job at a time); SIGTERM stops it gracefully.

The process also serves ``/metrics`` and ``/health`` on ``METRICS_PORT`` (``workers.status``).
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from app.jobs.queue import Queue
from app.jobs.settings import get_settings
from workers.status import serve_status
from workers.worker import Worker

log = logging.getLogger("workers")


def main() -> int:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    queue = Queue.from_settings(settings)
    worker = Worker(queue, settings, exit_on_hang=True)
    serve_status(worker, settings.metrics_port)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if worker.stopping:
            log.warning("second signal: exiting now")
            raise SystemExit(1)
        log.info("signal %d: stopping after handing back the job", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
