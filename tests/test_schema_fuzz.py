"""Schemathesis (the standard OpenAPI fuzzer) against the running API: a real uvicorn server, a
real redis-server and a worker. Every operation of the OpenAPI document, with every built-in
check but one: no 5xx, and every response conforms to the documented schema, status codes,
content types and headers.

The one left out, ``positive_data_acceptance``, expects every schema-valid request to be
accepted. OpenAPI cannot state this API's cross-field rules (``len(data) == prod(shape)``, k's head
dimension equal to q's, what the bytes of a safetensors body must hold), so a schema-valid body
is often rightly refused with a 4xx naming the field; the checks that remain still fail on any
5xx and on any refusal whose body, status or headers are not the documented ones.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def api_schema(live_server: Any, start_worker: Any) -> Any:
    start_worker()
    url = live_server(max_elements=4096)
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: Any) -> None:
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
