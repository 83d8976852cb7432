"""Property test of `kubetune api` against its own OpenAPI document: for every operation,
schemathesis generates requests (valid and not) and no answer may be a 5xx. Bounded: a fixed
number of examples per operation, no deadline (the machine is shared)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.gateway.test_app import local_api, subset  # noqa: E402

EXAMPLES = 15


def test_no_operation_answers_a_server_error(tmp_path: Path) -> None:
    started = time.time()
    with local_api(tmp_path) as url:
        # some real objects, so generated ids sometimes hit and paths go past the 404s
        file_id = requests.post(
            f"{url}/files", files={"file": ("t.jsonl", subset(20))}, data={"purpose": "fine-tune"}, timeout=10
        ).json()["id"]
        requests.post(
            f"{url}/fine_tuning/jobs", json={"model": "builtin://tiny-llama", "training_file": file_id}, timeout=10
        )
        doc = requests.get(url.removesuffix("/v1") + "/openapi.json", timeout=10).json()
        schema = schemathesis.openapi.from_dict(doc)
        base = url.removesuffix("/v1")
        seen: dict[str, set[int]] = {}
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 16  # 15 fine-tuning endpoints and chat completions
        for operation in operations:
            codes = seen.setdefault(f"{operation.method.upper()} {operation.path}", set())

            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def check(case) -> None:
                response = case.call(base_url=base, timeout=10)
                codes.add(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])

            check()
    assert all(codes for codes in seen.values())
    # the generated requests reached more than the error paths
    assert any(c == 200 for codes in seen.values() for c in codes)
    assert time.time() - started < 170
