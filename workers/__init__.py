"""Workers: take jobs from the Redis streams, run ``compute``, store results.

``python -m workers`` runs one.
"""

from workers.worker import Worker, run_op

__all__ = ["Worker", "run_op"]
