"""Schemathesis against the app's own OpenAPI document, served by a real process.

Bounded examples per operation so CI stays fast; every response must conform to the schema (status
code documented, body matching its model) and none may be a server error. One check is left out:
"schema-valid data is accepted" cannot hold for uploads, since no schema can say "a decodable JPEG" and
random bytes in the `image` field are rightly refused with 400/415.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.served import served

EXAMPLES_PER_OPERATION = 25
KEY = "schemathesis-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"PALIGEMMA_DEFAULT_MAX_NEW_TOKENS": "2", "PALIGEMMA_MAX_NEW_TOKENS": "4",
           "PALIGEMMA_API_KEYS": KEY, "PALIGEMMA_METRICS_REQUIRE_KEY": "true"}
    with served(tmp_path_factory.mktemp("schemathesis"), env=env) as s:
        yield s


def test_every_operation_conforms_and_never_fails(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: dict[str, set[int]] = {}

    def run(operation) -> None:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            # The valid key is sent; schemathesis also tries without it and with wrong ones (401 expected).
            response = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                                              excluded_checks=[positive_data_acceptance])
            statuses.setdefault(operation.label, set()).add(response.status_code)

        check()

    for operation in operations:
        run(operation)

    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert not [label for label, codes in statuses.items() if any(code >= 500 for code in codes)], statuses
