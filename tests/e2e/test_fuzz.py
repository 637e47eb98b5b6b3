"""Schemathesis over the served OpenAPI document, against the real application over HTTP.

Every operation gets generated valid and invalid requests (auth off, then auth on with a key);
no answer may be a server error, and every answer must have a status and a body the document
declares. A few hundred cases in all, bounded in time: generation limits are kept small so
that a valid request costs a few tokens, not a full context.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from serve_app.config import AppArgs
from tests.e2e.conftest import ServeSession, app_args

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
EXAMPLES_PER_MODE = 20  # per operation and mode; a GET without parameters has one case
MAX_TOKENS = 4  # valid requests generate a few tokens: the point is the input, not the output
MAX_CHOICES = 2
KEY = "sk-fuzz-0123456789"
KEYS_FILE = Path(tempfile.mkdtemp()) / "api_keys"
KEYS_FILE.write_text(f"fuzzer:{KEY}\n")


@dataclass
class FuzzReport:
    """What one run sent and every check that failed, by operation."""

    cases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _bounded(case: Case) -> Case:
    """Valid generation requests, but small ones: few tokens and few choices."""
    body = case.body
    if isinstance(body, dict):
        for name, limit in (
            ("max_tokens", MAX_TOKENS),
            ("max_completion_tokens", MAX_TOKENS),
            ("n", MAX_CHOICES),
            ("best_of", MAX_CHOICES),
        ):
            if isinstance(body.get(name), int) and not isinstance(body[name], bool):
                body[name] = min(body[name], limit)
        if body.get("min_tokens") is not None and isinstance(body["min_tokens"], int):
            body["min_tokens"] = min(body["min_tokens"], 1)
    elif isinstance(body, list):  # /v1/batch_infer: a few items
        del body[MAX_CHOICES:]
        for item in body:
            if isinstance(item, dict) and isinstance(item.get("max_tokens"), int):
                item["max_tokens"] = min(item["max_tokens"], MAX_TOKENS)
    return case


def fuzz(base_url: str, headers: dict[str, str]) -> FuzzReport:
    """Run every operation's generated cases against ``base_url``; collect, never raise."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers, timeout=30)
    report = FuzzReport()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            # Invalid input needs some input to spoil: a GET without parameters has none (and
            # the headers, the API key among them, are fixed).
            inputs = (operation.body, operation.query, operation.path_parameters)
            takes_input = any(len(parameters) > 0 for parameters in inputs)
            modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * takes_input
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode, headers=headers)
                if mode is GenerationMode.POSITIVE:
                    strategy = strategy.map(_bounded)
                _run_cases(strategy, base_url, session, headers, report)
    return report


def _run_cases(
    strategy: st.SearchStrategy[Case],
    base_url: str,
    session: requests.Session,
    headers: dict[str, str],
    report: FuzzReport,
) -> None:
    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure here is reproducible
        phases=[Phase.explicit, Phase.generate],  # failures are collected, not shrunk
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Case) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
        report.cases += 1
        report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except AssertionError as failure:  # schemathesis' failures group is an AssertionError
            report.failures.append(
                f"{case.operation.label} -> {response.status_code}: {failure}\n"
                f"  reproduce: {case.as_curl_command(headers=headers)}"
            )

    run()


def _assert_clean(report: FuzzReport) -> None:
    assert report.cases >= 200, report
    assert not report.failures, "\n\n".join(report.failures[:10])
    assert all(status < 500 for status in report.statuses), report.statuses
    # Both kinds of case reached the service: accepted requests and refused ones.
    assert any(status == 200 for status in report.statuses), report.statuses
    assert any(400 <= status < 500 for status in report.statuses), report.statuses


def test_generated_requests_get_no_server_error_and_documented_answers(
    served_app: str,
) -> None:
    _assert_clean(fuzz(served_app, {}))


def test_generated_requests_with_an_api_key_get_documented_answers(
    model_dir: Path, serve_session: ServeSession, served_app: str
) -> None:
    del served_app  # the keyless application first, so the module above shares it
    settings_with_keys = AppArgs.model_validate(
        app_args(model_dir, auth={"api_keys_file": str(KEYS_FILE)})
    )
    serve_session.deploy(settings_with_keys, None)
    assert requests.get(f"{serve_session.base_url}/openapi.json", timeout=30).status_code == 401
    headers = {"Authorization": f"Bearer {KEY}"}
    _assert_clean(fuzz(serve_session.base_url, headers))
