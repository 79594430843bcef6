"""Property-based requests over the OpenAPI document against the live server (schemathesis):
whatever it sends, the server never answers with a 5xx, every status it answers is documented,
and every error has the contract's shape."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.integration.api.conftest import Server

pytestmark = pytest.mark.slow


MAX_EXAMPLES = 30


def test_no_input_makes_the_server_fail(server: Server) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/plans", "GET /v1/plans", "POST /v1/probes"}
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def one_request(case: Any) -> None:
            # A valid plan request the cache cannot answer would wait `wait` seconds for a worker.
            if case.query and "wait" in case.query:
                case.query["wait"] = 0
            response = case.call(headers={"Authorization": f"Bearer {server.token}"}, timeout=30)
            statuses.append(response.status_code)
            case.validate_response(
                response, checks=[not_a_server_error, status_code_conformance, content_type_conformance]
            )
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"detail", "code"} and body["detail"], body

        one_request()
    # The run really exercised the server: many requests, both accepted and refused ones.
    assert len(statuses) >= 5 * len(operations)
    assert any(s < 300 for s in statuses) and any(s == 422 for s in statuses)
