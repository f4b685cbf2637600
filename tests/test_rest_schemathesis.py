"""schemathesis against the generated schema: no 500, and every answer conforms to the schema.

Every operation of /api/schema/ is called in-process (WSGI, the test database) with cases
Hypothesis draws from the schema, valid and invalid ones, as a superuser's write token. The
run is bounded: EXAMPLES cases per operation and mode, no example database, no deadline, a
fixed seed (derandomize) so a failure reproduces. A failing case is shrunk and reported with
the operation it came from; all failures are collected before the test fails.
"""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.django_db

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "6"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def keep_the_test_connection():
    """The raw WSGI handler closes the connection after each request, as Django's test client
    avoids doing: that would end the test's transaction (and SQLite's in-memory database)."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def test_every_operation_holds_to_the_generated_schema(catalog, keep_the_test_connection):
    from config.wsgi import application
    from portal.models import User
    from portal.tokens import token_issue

    admin = User.objects.create_superuser("fuzz", "fuzz@example.com", "x" * 20)
    auth = {"Authorization": f"Bearer {token_issue(admin, name='fuzz', scope='write').raw}"}
    schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)

    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                print_blob=False,
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                response = case.call(headers=auth)
                case.validate_response(response, checks=CHECKS, headers=auth)

            try:
                call()
            except Exception as exc:  # collected: one report for every operation
                failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])
    assert operations > 50, f"only {operations} operations in the schema"
    assert not failures, "\n\n".join(failures)
