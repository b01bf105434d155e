"""The real server fuzzed from its own OpenAPI schema (schemathesis + Hypothesis, fixed seed).

Every request the schema allows gets a 2xx or a documented 4xx, never a 5xx; every response has a status
code, content type and body the schema documents. Generation is capped at a few tokens per request: the
fuzzer probes what the server accepts and refuses, not how long it can generate.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_process import start_server, stop_server

KEY = "fuzz-key"
CASES_PER_OPERATION = 260  # 4 operations take bodies: over 1,000 cases (those without inputs run once)
GENERATED_TOKENS = 2  # two, so text still streams across tokens
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--api-key", KEY, "--kv-cache-gb", "0.1", "--max-num-seqs", "64")
    yield base
    stop_server(proc)


def _short(body):
    """The case's body with its token budget capped (left as drawn when it is not a number: that is validation)."""
    if not isinstance(body, dict):
        return body
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:  # left out or null: the server's default (256) would generate for seconds
            body[key] = GENERATED_TOKENS
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # 21.0 is a valid integer too
            body[key] = min(value, GENERATED_TOKENS)
    return body


def test_no_request_the_schema_allows_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                               "POST /tokenize", "POST /detokenize", "GET /v1/models"}
    seen: dict[str, int] = {}
    for op in operations:
        @settings(max_examples=CASES_PER_OPERATION, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def fuzz(case):
            if case.operation.label.endswith("completions"):
                case.body = _short(case.body)
            response = case.call(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
            case.validate_response(response, checks=CHECKS)
            seen[op.label] = seen.get(op.label, 0) + 1

        fuzz()
    assert sum(seen.values()) >= 1000, seen
    assert min(seen[label] for label in ("POST /v1/completions", "POST /v1/chat/completions")) >= 200, seen
