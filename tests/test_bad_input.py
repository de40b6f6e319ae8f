"""Input at the edge never makes a 500: bounded ints, finite floats, strict ints, dates, seeds, odd text,
deeply nested imports and SQLite files that would make reading them unbounded work.

Real server on 127.0.0.1 (tiny model), real SQLCipher store, real `ownlm import` processes.
"""

import json
import os
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import websockets.sync.client as ws_client

from ownlm.engine import GenerationParams
from ownlm.errors import ImportFormatError, InvalidInput
from tests.test_capture import node  # noqa: F401  (fixture; tiny_engine comes from conftest)

CHAT = "/v1/chat/completions"
INTERACTIONS = "/api/personalization/interactions"
USER = [{"role": "user", "content": "hi"}]


def raw_post(node, path, text: str) -> httpx.Response:
    return node.client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def assert_clear_422(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] in ("InvalidInput", "ImportFormatError") and err["hint"], err
    for w in words:
        assert w in err["message"], err


@pytest.mark.parametrize("params, word", [
    ({"offset": 2**63}, "offset"),  # one past SQLite's int64
    ({"offset": -1}, "offset"),
    ({"limit": 2**64}, "limit"),
])
def test_query_ints_beyond_sqlite(node, params, word):
    assert_clear_422(node.client.get("/api/personalization/conversations", params=params), word)


def test_largest_offset_is_fine(node):
    r = node.client.get("/api/personalization/conversations", params={"offset": 2**63 - 1})
    assert r.status_code == 200 and r.json()["conversations"] == []


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e300", "-5"])
def test_timestamps_must_be_finite_dates(node, value):
    body = '{"messages": [{"role": "user", "content": "x", "timestamp": %s}]}' % value
    assert_clear_422(raw_post(node, INTERACTIONS, body), "timestamp")
    assert node.store.stats(node.user.id)["messages"] == 0


@pytest.mark.parametrize("field, value", [
    ("temperature", "NaN"), ("top_p", "NaN"), ("temperature", "Infinity"), ("seed", str(2**70)), ("seed", str(2**64)), ("seed", "-1"),
    ("seed", "true"), ("max_tokens", "true"), ("max_tokens", "2.0"),
])
def test_chat_parameters_are_checked_before_generation(node, field, value):
    extra = "" if field == "max_tokens" else '"max_tokens": 2, '
    for stream in ("false", "true"):
        body = '{"messages": [{"role": "user", "content": "hi"}], %s"%s": %s, "stream": %s}' % (extra, field, value, stream)
        assert_clear_422(raw_post(node, CHAT, body), field)


def test_largest_seed_generates(node):
    r = node.client.post(CHAT, json={"messages": USER, "max_tokens": 2, "seed": 2**63})
    assert r.status_code == 200, r.text


def test_generation_params_bound_the_seed():
    for seed in (2**63 + 1, 2**64, -1, True, 1.5):
        with pytest.raises(InvalidInput, match="seed"):
            GenerationParams(seed=seed)
    assert GenerationParams(seed=2**63).seed == 2**63


def test_websocket_seed_and_bools_are_an_error_frame(node):
    url = node.url.replace("http", "ws") + "/ws/chat?token=" + node.token
    with ws_client.connect(url) as ws:
        for bad in ({"seed": 2**70}, {"seed": -1}, {"max_tokens": True}, {"temperature": float("nan")}):
            ws.send(json.dumps({"content": "hi", "max_tokens": 2, **bad}))
            event = json.loads(ws.recv(timeout=30))
            assert event["type"] == "error" and event["error"]["type"] == "InvalidInput", event
        ws.send(json.dumps({"content": "hi", "max_tokens": 2, "seed": 2**63}))  # and the socket still works
        events = [json.loads(ws.recv(timeout=60))]
        while events[-1]["type"] not in ("done", "error"):
            events.append(json.loads(ws.recv(timeout=60)))
        assert events[-1]["type"] == "done", events[-1]


@pytest.mark.parametrize("before", [
    "0001-01-01T00:00:00",  # naive: UTC (a local-time conversion of year 1 overflows)
    "0001-01-01",
    "9999-12-31T23:59:59",
    "0001-01-01T00:00:00+14:00",
])
def test_delete_dates_at_the_ends_of_time(node, before):
    node.client.post(INTERACTIONS, json={"messages": USER})
    r = node.client.get("/api/personalization/delete-preview", params={"before": before})
    assert r.status_code == 200, r.text
    expected = 1 if before.startswith("9999") else 0
    assert r.json()["would_delete"]["messages"] == expected


@pytest.fixture
def new_york():
    """The node's local time is not UTC (the process's time zone, restored afterwards)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def test_naive_dates_are_utc(node, new_york):
    node.client.post(INTERACTIONS, json={"messages": [{"role": "user", "content": "x", "timestamp": 86400 * 365}]})
    # 1971-01-01T00:00:00 naive is that instant in UTC, whatever the node's time zone
    preview = lambda b: node.client.get("/api/personalization/delete-preview", params={"before": b}).json()  # noqa: E731
    assert preview("1971-01-01T00:00:01")["would_delete"]["messages"] == 1
    assert preview("1971-01-01T00:00:00")["would_delete"]["messages"] == 0


@pytest.mark.parametrize("feedback, word", [
    ({"message_index": False, "thumbs": 1}, "message_index"),
    ({"message_index": 1.0, "thumbs": 1}, "message_index"),
    ({"message_index": -1, "thumbs": 1}, "message_index"),
    ({"thumbs": True}, "thumbs"),
    ({"rating": True}, "rating"),
])
def test_feedback_ints_are_strict(node, feedback, word):
    body = {"messages": [*USER, {"role": "assistant", "content": "hello"}], "feedback": feedback}
    assert_clear_422(node.client.post(INTERACTIONS, json=body), word)
    assert node.store.stats(node.user.id)["messages"] == 0


def test_feedback_route_ints_are_strict(node):
    ids = node.client.post(INTERACTIONS, json={"messages": [*USER, {"role": "assistant", "content": "o"}]}).json()
    r = node.client.post("/api/personalization/feedback", json={"message_id": ids["message_ids"][1], "thumbs": True})
    assert_clear_422(r, "thumbs")


def test_lone_surrogates_are_refused(node):
    text = '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert_clear_422(raw_post(node, INTERACTIONS, text), "content")
    assert_clear_422(raw_post(node, CHAT, text[:-1] + ', "max_tokens": 2}'), "content")


# ---------------------------------------------------------------- imports


def deep_json(path, depth=100_000):
    path.write_text('{"conversations": ' + "[" * depth + "]" * depth + "}")
    return path


def import_file(node, path, **data) -> httpx.Response:
    with open(path, "rb") as f:
        return node.client.post("/api/personalization/import", files={"file": (path.name, f)}, data=data, timeout=30)


def test_deeply_nested_json_import(node, tmp_path):
    path = deep_json(tmp_path / "conversations.json")
    assert_clear_422(import_file(node, path), "conversations.json", "deep")
    assert_clear_422(import_file(node, path, format="chatgpt"), "deep")
    lines = tmp_path / "train.jsonl"
    lines.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n' + '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    r = import_file(node, lines)
    assert r.status_code == 200, r.text
    assert r.json()["messages"] == 1 and "deep" in r.json()["bad"][0]["reason"]


def test_deeply_nested_json_cli(home, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ownlm", "import", str(deep_json(tmp_path / "c.json"))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and "deep" in r.stderr


def view_bomb(path):
    """8 KB: an llm logs.db whose `conversations` is a view over an endless recursive query (no rows come out,
    so reading it costs no memory, only a core for as long as it runs). Capitalised: SQLite names ignore case."""
    db = sqlite3.connect(path)
    db.executescript(
        "create table responses (id text, model text, prompt text, system text, response text,"
        " conversation_id text, datetime_utc text);"
        "create view Conversations as with recursive r(n) as (select 1 union all select n + 1 from r)"
        " select n as id, 'x' as name, 'm' as model from r where n < 0;"
    )
    db.close()
    assert path.stat().st_size <= 8192
    return path


def test_sqlite_view_bomb_api(node, tmp_path):
    start = time.monotonic()
    r = import_file(node, view_bomb(tmp_path / "logs.db"))
    assert_clear_422(r, "view")
    assert time.monotonic() - start < 5


def test_sqlite_view_bomb_cli(home, tmp_path):
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ownlm", "import", str(view_bomb(tmp_path / "logs.db"))],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "view" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert time.monotonic() - start < 30  # mostly interpreter start-up


def test_sqlite_computed_columns_are_refused(tmp_path):
    from ownlm.capture.importers import parse_file

    path = tmp_path / "logs.db"
    db = sqlite3.connect(path)
    db.executescript(
        "create table responses (id text, model text, prompt text, system text, conversation_id text,"
        " datetime_utc text, response text generated always as (hex(zeroblob(100000000))));"
        "insert into responses (id, prompt) values ('a', 'b');"
    )
    db.close()
    with pytest.raises(ImportFormatError, match="computed"):
        parse_file(path)


def test_sqlite_work_is_bounded(tmp_path):
    """A plain logs.db whose reading needs more than its budget of SQLite steps is refused, not read on."""
    from ownlm.capture.importers import llm_logs, parse_file

    path = tmp_path / "logs.db"
    db = sqlite3.connect(path)
    db.execute("create table responses (id text, model text, prompt text, system text, response text,"
               " conversation_id text, datetime_utc text)")
    db.executemany("insert into responses (id, prompt, response) values (?, 'q', 'a')", [(str(i),) for i in range(20_000)])
    db.commit()
    db.close()
    assert parse_file(path).message_count == 40_000  # within the budget a file of its size gets
    with pytest.raises(ImportFormatError, match="more work"):
        llm_logs.parse(path, max_steps=100_000)


def test_lone_surrogates_in_an_export_become_replacement_characters(node, tmp_path):
    """An export may hold half of a cut emoji (a JSON "\\ud83d" escape): the file still imports."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "cut \\ud83d emoji"}, {"role": "assistant", "content": "ok"}]}\n')
    r = import_file(node, path)
    assert r.status_code == 200, r.text
    conv = node.client.get("/api/personalization/conversations").json()["conversations"][0]["id"]
    messages = node.client.get(f"/api/personalization/conversations/{conv}").json()["messages"]
    assert messages[0]["content"] == "cut \ufffd emoji"


def test_privacy_tier_is_a_strict_int(node):
    r = node.client.post("/api/personalization/privacy", json={"tier": True})
    assert_clear_422(r, "tier")
    assert node.client.get("/api/personalization/privacy").json()["tier"] == 1


def test_websocket_deep_json_is_an_error_frame(node):
    url = node.url.replace("http", "ws") + "/ws/chat?token=" + node.token
    with ws_client.connect(url) as ws:
        ws.send("[" * 50_000 + "]" * 50_000)
        event = json.loads(ws.recv(timeout=30))
        assert event["type"] == "error" and "deep" in event["error"]["message"], event
        ws.send("not json")  # the socket still answers
        assert json.loads(ws.recv(timeout=30))["type"] == "error"
