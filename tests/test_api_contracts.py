"""schemathesis over the balancer's own API and the backend's, real processes on loopback.

Each operation of each OpenAPI document (the balancer's at /admin/openapi.json, the
backend's at /openapi.json, /work included) is called with generated valid and invalid
inputs, with the right tokens: no answer may be a 5xx, and every answer must conform to
the document (documented status, content type and body schema). Examples are bounded so
the file stays fast on a shared machine.

The backend's PUT /control/fault is left out: a valid fault (an error or crash fault)
makes the node answer 5xx or exit by design, which is what it is for.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from twlb.processes.managed import ManagedProcess, free_port, pid_alive, twlb_argv

ADMIN_TOKEN = "contract-admin"
CONTROL_TOKEN = "contract-control"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
MAX_EXAMPLES = 25


def _start(log_dir, service: str, *args: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = ManagedProcess(
        twlb_argv(service, "--host", "127.0.0.1", "--port", str(port), *args),
        log_path=log_dir / f"{service}-{port}.log",
    ).start()
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    log_dir = tmp_path_factory.mktemp("contracts")
    quiet = ("--log-level", "warning")
    backend, backend_url = _start(
        log_dir, "backend", "--no-simulation", "--control-token", CONTROL_TOKEN, *quiet
    )
    balancer, balancer_url = _start(
        log_dir, "balancer", "--backend", backend_url, "--admin-token", ADMIN_TOKEN, *quiet
    )
    procs = [backend, balancer]
    try:
        backend.wait_ready(backend_url + "/healthz", timeout=60)
        balancer.wait_ready(balancer_url + "/healthz", timeout=60)
        yield {"backend": backend_url, "balancer": balancer_url}
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            assert not pid_alive(p.pid), f"process {p.pid} outlived its tests"


@pytest.fixture(scope="module")
def balancer_api(services: dict[str, str]) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(services["balancer"] + "/admin/openapi.json")


@pytest.fixture(scope="module")
def backend_api(services: dict[str, str]) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(services["backend"] + "/openapi.json")
    return schema.exclude(method="PUT", path="/control/fault")


bounded = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,  # a loaded machine; time is bounded by the example count instead
    suppress_health_check=list(HealthCheck),
    database=None,
)


def check_every_operation(schema: schemathesis.BaseSchema, token: str) -> list[str]:
    """Call every operation with valid then invalid generated inputs; returns their names."""
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        inputs = [operation.path_parameters, operation.query, operation.headers, operation.body]
        # Invalid input can only be generated for an operation that takes some.
        modes = [GenerationMode.POSITIVE]
        if any(len(p) for p in inputs):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @bounded
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: schemathesis.Case) -> None:
                case.call_and_validate(
                    headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=10
                )

            call()
        checked.append(f"{operation.method.upper()} {operation.path}")
    return checked


def test_the_balancer_api_answers_every_input_as_documented_and_never_5xx(
    balancer_api: schemathesis.BaseSchema,
) -> None:
    checked = check_every_operation(balancer_api, ADMIN_TOKEN)
    assert {"POST /admin/backends", "DELETE /admin/backends", "GET /trust"} <= set(checked)


def test_the_backend_api_work_included_answers_as_documented_and_never_5xx(
    backend_api: schemathesis.BaseSchema,
) -> None:
    checked = check_every_operation(backend_api, CONTROL_TOKEN)
    # /work bypasses FastAPI; without its own description it would not be checked here.
    assert {"GET /work", "GET /control/fault", "GET /healthz"} <= set(checked)
    assert "PUT /control/fault" not in checked
