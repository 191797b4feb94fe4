"""``python -m app``: the API under uvicorn on ``HOST``:``PORT``.

Refuses to start when it would serve other hosts without an API key: ``HOST`` is not a loopback
address, ``API_KEY`` is empty and ``ALLOW_OPEN`` is not set.
"""

from __future__ import annotations

import ipaddress
import sys

import uvicorn

from app.jobs.settings import get_settings


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main() -> int:
    settings = get_settings()
    if not settings.api_keys and not settings.allow_open and not _loopback(settings.host):
        print(
            f"refusing to serve on {settings.host} without an API key: set API_KEY (clients send "
            "`Authorization: Bearer <key>`), or ALLOW_OPEN=1 to serve openly, or HOST=127.0.0.1",
            file=sys.stderr,
        )
        return 2
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
