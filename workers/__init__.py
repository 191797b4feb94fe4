"""Redis consumers: ``python -m workers`` runs one worker process (``workers.worker``).

OpenMP threads that spin while waiting burn the cores the API, Redis and other workers need, and
a spinning barrier whose partner thread is descheduled turns a 0.2 ms job into tens of ms. So a
worker process waits passively unless told otherwise; this has to be set before torch loads its
OpenMP runtime, hence here, the first module ``python -m workers`` imports.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
