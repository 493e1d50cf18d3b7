"""API fuzzing harness: schemathesis cases from the generated OpenAPI, sent to the REST gateway.

Each operation of ``gen/openapi/azora.swagger.json`` gets `examples` generated requests, half
valid by the schema and half not (schemathesis' positive and negative modes), sent with a
tenant's credentials. Path parameters that name objects (``id``, ``domainId``) are sometimes
replaced by ids of objects that really exist, so the fuzzer reaches the code behind the
NOT_FOUND check too. Every answer goes through schemathesis' checks:

* ``not_a_server_error``: no 5xx;
* ``status_code_conformance``, ``content_type_conformance``, ``response_schema_conformance``:
  the answer is one the document declares, with the declared media type and shape.

The run blocks (requests are synchronous), so a test calls `run` in a worker thread while the
gateway keeps serving on the event loop. Failures are collected, not raised on the first one:
Hypothesis' shrinking would spend the CI time budget on one failure and hide the others.
`FUZZ_EXAMPLES` (environment) sets the examples per operation: small in CI, large under
``make fuzz``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

OPENAPI = Path(__file__).resolve().parents[2] / "gen" / "openapi" / "azora.swagger.json"
# Examples per operation and mode in CI (the whole run stays well under a minute).
DEFAULT_EXAMPLES = 12
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Path parameters that hold object ids, and which kind of object each names.
ID_PARAMETERS = {"domainId": "domain", "id": "object"}


def examples_per_operation() -> int:
    """FUZZ_EXAMPLES from the environment, else the CI default."""
    return int(os.environ.get("FUZZ_EXAMPLES", DEFAULT_EXAMPLES))


@dataclass
class Finding:
    """One request whose answer failed a check."""

    operation: str
    status: int
    problem: str
    reproduce: str

    def __str__(self) -> str:
        return f"{self.operation} -> {self.status}: {self.problem}\n    {self.reproduce}"


@dataclass
class FuzzReport:
    """What a run sent and what it found."""

    requests_by_operation: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)


def load_schema() -> Any:
    """The generated OpenAPI document as a schemathesis schema."""
    return schemathesis.openapi.from_path(str(OPENAPI), config=schemathesis.Config())


def operation_labels(schema: Any) -> list[str]:
    """Labels ("METHOD /path") of every operation the document declares."""
    return sorted(
        f"{result.ok().method.upper()} {result.ok().path}" for result in schema.get_all_operations()
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # Schemathesis failures are long; the first lines say what was wrong.
    return "\n      ".join(text.splitlines()[:8])


def run(
    *,
    base_url: str,
    token: str,
    examples: int,
    domain_ids: Sequence[str],
    object_ids: Sequence[str],
) -> FuzzReport:
    """Fuzz every operation of the document through the gateway at `base_url`.

    Args:
        base_url: The gateway, e.g. "http://127.0.0.1:41234".
        token: Bearer credentials of the tenant the requests act as.
        examples: Generated requests per operation and generation mode.
        domain_ids: Ids of existing domains, substituted into `domainId`/`id` now and then.
        object_ids: Ids of other existing objects (emails, API keys) for `id` parameters.
    """
    schema = load_schema()
    report = FuzzReport()
    session = requests.Session()
    headers = {"Authorization": f"Bearer {token}"}
    known = {"domain": list(domain_ids), "object": [*domain_ids, *object_ids]}

    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        report.requests_by_operation[label] = 0
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not _has_inputs(operation):
                continue
            strategy = operation.as_strategy(generation_mode=mode)
            try:
                _fuzz_operation(
                    strategy, label, examples, base_url, session, headers, known, report
                )
            except hypothesis.errors.Unsatisfiable:
                # Some operations have no invalid input at all (a string path parameter
                # accepts any string): nothing negative to send.
                if mode is GenerationMode.POSITIVE:
                    raise
    session.close()
    return report


def _has_inputs(operation: Any) -> bool:
    """Whether a negative example exists (an operation without parameters has none)."""
    definition = operation.definition.raw
    return bool(definition.get("parameters"))


def _fuzz_operation(
    strategy: Any,
    label: str,
    examples: int,
    base_url: str,
    session: requests.Session,
    headers: dict[str, str],
    known: dict[str, list[str]],
    report: FuzzReport,
) -> None:
    substitutions = st.fixed_dictionaries(
        {
            name: st.one_of(st.none(), st.sampled_from(known[kind])) if known[kind] else st.none()
            for name, kind in ID_PARAMETERS.items()
        }
    )

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=strategy, ids=substitutions)
    def fuzz(case: Any, ids: dict[str, str | None]) -> None:
        for name, value in ids.items():
            if value is not None and case.path_parameters and name in case.path_parameters:
                case.path_parameters[name] = value
        if case.headers:
            # Credentials are ours, never generated (a generated x-api-key would only test
            # the rejection of garbage keys, which tests/security does on purpose).
            for name in list(case.headers):
                if name.lower() in ("authorization", "x-api-key"):
                    del case.headers[name]
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        report.requests_by_operation[label] += 1
        report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # every failed check is a finding
            report.findings.append(
                Finding(
                    operation=label,
                    status=response.status_code,
                    problem=_describe(exc),
                    reproduce=case.as_curl_command(headers=headers),
                )
            )

    fuzz()
