"""``python tests/fault_worker.py``: the real worker process, with a compute that misbehaves on
purpose for jobs whose ``eps`` is one of the markers below (fault-injection tests only).

- ``eps == CRASH_EPS``: the process dies at once (SIGKILL to itself), as a segfault or the OOM
  killer would end it: no exception, no hand-back, no final write.
- ``eps == HANG_EPS``: the compute never returns and never reaches a block boundary, while the
  lease thread keeps the worker's lease alive (a hung kernel, a deadlock).

Every other job runs the normal compute.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

CRASH_EPS = 0.000123
HANG_EPS = 0.000321


def main() -> int:
    import workers.worker as w
    from workers.__main__ import main as worker_main

    real = w.run_op

    def run_op(op: str, inputs: Any, params: Any, **kwargs: Any) -> Any:
        if params.get("eps") == CRASH_EPS:
            os.kill(os.getpid(), signal.SIGKILL)
        if params.get("eps") == HANG_EPS:
            while True:
                time.sleep(3600)
        return real(op, inputs, params, **kwargs)

    w.run_op = run_op
    return worker_main()


if __name__ == "__main__":
    sys.exit(main())
