"""API fuzzing: schemathesis generates requests from the node's own served OpenAPI spec and checks each answer.

A real node on 127.0.0.1 (ThreadServer + create_app) with a fresh home, a real SQLCipher store, a valid token
and a fake engine at the model boundary (generation is not what is tested here, and max_tokens may be 32768).
Every operation of the spec is fuzzed with schema-valid and schema-invalid data through the coverage (boundary
values) and fuzzing phases; each response must be no 5xx and inside the spec: a declared status code, a
declared content type, a body matching the declared schema, and 401 without the token.

Budget: FUZZ_EXAMPLES generated requests per operation (default 15, a few tens of seconds on 2 cores, for `make test`);
`make fuzz` runs 500 per operation (> 5,000 cases in all). The counts go to test-output/fuzz-report.json.
Not fuzzed: WebSocket /ws/chat, which an OpenAPI spec cannot describe (tests/test_api.py drives it).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e '.[test]')")
from schemathesis import engine  # noqa: E402  (after the importorskip)
from schemathesis.engine import Status, events  # noqa: E402

from ownlm.api.app import create_app  # noqa: E402
from ownlm.engine.base import GenerationStream, validate_messages  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import NewMessage, Store  # noqa: E402
from tests.servers import ThreadServer  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
REPORT = Path(__file__).resolve().parents[1] / "test-output" / "fuzz-report.json"
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "ignored_auth", "unsupported_method"]


class FakeEngine:
    """The engine protocol (engine/base.py) without a model: a few fixed pieces, at most max_tokens of them."""

    model_name = "fake-base"

    def stream(self, messages, params) -> GenerationStream:
        validate_messages(messages)
        pieces = ["fuzz", " ", "answer", "."][: params.max_tokens]

        def run():
            for p in pieces:
                stream.completion_tokens += 1
                yield p
            stream.finish_reason = "length" if len(pieces) == params.max_tokens else "stop"

        stream = GenerationStream(run(), prompt_tokens=sum(len(m["content"].split()) for m in messages))
        return stream


@pytest.fixture
def fuzz_node(home):
    """A fresh node with one user, a token and a little data (so ids in paths can hit something)."""
    settings_ = load_settings(max_body_bytes=256 * 1024)
    store = Store(home)
    user = store.create_user("fuzz")
    token = store.create_token(user.id)
    store.capture(user.id, [NewMessage("user", "hello"), NewMessage("assistant", "hi")], source="api", seed="live")
    with ThreadServer(create_app(settings_, store, FakeEngine())) as server:
        server.token = token
        yield server
    store.close()


def fuzz(url: str, token: str) -> dict:
    """Run schemathesis' engine (what `schemathesis run` runs) on the served spec; a summary of every case."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    schema.config.update(base_url=url, headers={"Authorization": f"Bearer {token}"}, request_timeout=30,
                         continue_on_failure=True, workers=1)
    schema.config.generation.update(max_examples=EXAMPLES, modes=["positive", "negative"], database="none")
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    schema.config.checks.update(included_check_names=CHECKS)
    statuses: dict[str, Counter] = {}
    failures: list[dict] = []
    stop = None
    for event in engine.from_schema(schema).execute():
        # the run itself broke (a spec it cannot use, an exception in schemathesis): a failure too
        if isinstance(event, events.NonFatalError):
            failures.append({"operation": event.label, "error": repr(event.value)[:500]})
        if isinstance(event, events.FatalError):
            failures.append({"operation": None, "error": repr(event.exception)[:500]})
        if isinstance(event, events.EngineFinished):
            stop = str(event.stop_reason)
        if not isinstance(event, events.ScenarioFinished) or not event.is_test_scenario:
            continue
        rec = event.recorder
        for case_id, interaction in rec.interactions.items():
            case = rec.cases[case_id].value
            op = f"{case.method.upper()} {case.operation.path}"
            status = interaction.response.status_code if interaction.response is not None else 0
            statuses.setdefault(op, Counter())[status] += 1
            for check in rec.checks.get(case_id, []):
                if check.status == Status.FAILURE and check.failure_info is not None:
                    f = check.failure_info.failure
                    failure = {"operation": op, "check": check.name, "status": status, "title": f.title,
                               "message": f.message[:300], "request": _request(interaction.request)}
                    failures.append(failure)
    total = sum(sum(c.values()) for c in statuses.values())
    return {"examples_per_operation": EXAMPLES, "cases": total, "stop_reason": stop,
            "server_errors": sum(n for c in statuses.values() for status, n in c.items() if status >= 500),
            "failures": _distinct(failures),
            "statuses": {op: dict(sorted(c.items())) for op, c in sorted(statuses.items())}}


def _request(r) -> str:
    body = (r.body or b"")[:300].decode("utf-8", "replace")
    return f"{r.method} {r.uri} {body}".strip()  # the whole URI: the query is often what failed


def _distinct(failures: list[dict]) -> list[dict]:
    """One entry per (operation, check, title), with how often it happened and the first request that did it."""
    seen: dict[tuple, dict] = {}
    for f in failures:
        key = (f.get("operation"), f.get("check"), f.get("title"), f.get("status"))
        if key in seen:
            seen[key]["times"] += 1
        else:
            seen[key] = {**f, "times": 1}
    return list(seen.values())


def test_the_node_answers_every_generated_request_inside_its_spec(fuzz_node):
    spec = httpx.get(fuzz_node.url + "/openapi.json").json()
    operations = {f"{m.upper()} {path}" for path, ops in spec["paths"].items() for m in ops}
    report = fuzz(fuzz_node.url, fuzz_node.token)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=1))
    assert report["stop_reason"] == "completed", report["stop_reason"]
    assert operations <= set(report["statuses"]), operations - set(report["statuses"])  # each one was fuzzed
    assert all(sum(report["statuses"][op].values()) >= 3 for op in operations), report["statuses"]
    assert report["failures"] == [], json.dumps(report["failures"], indent=1)[:6000]
    assert report["server_errors"] == 0

