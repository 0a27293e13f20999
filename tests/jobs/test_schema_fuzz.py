"""Property-based fuzzing of every operation in the OpenAPI schema (schemathesis): no 5xx, and every response,
errors included, matches the schema it documents. Runs in-process against the Postgres + S3 app."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from langadapt.jobs import execution

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 30


@pytest.fixture
def settings(make_settings):
    return make_settings(worker_beat_interval_s=3600)  # one recorded beat keeps /readyz ready for the whole run


def test_no_server_errors_and_responses_match_the_schema(client, auth, settings) -> None:
    with client.app.state.services.sessions() as session:  # a GPU worker is alive: /readyz may answer 200
        execution.worker_beat(session, name="fuzz@host", queues=[settings.queue("gpu")], pid=1)
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route is documented, so every route is fuzzed

    failures = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case) -> None:
            case.call_and_validate(headers={**(case.headers or {}), **auth}, checks=CHECKS)

        try:
            fuzz()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
