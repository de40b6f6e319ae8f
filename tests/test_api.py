"""The node's HTTP and WebSocket API against a real server on 127.0.0.1 with the tiny model."""

import json

import httpx
import pytest
import websockets.sync.client as ws_client

from ownlm.api.app import create_app
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.servers import ThreadServer

MARKER = "MARKER-api-51c0-walrus"


@pytest.fixture
def node(home, tiny_engine):
    settings = load_settings(max_body_bytes=64 * 1024)
    store = Store(settings.home)
    alice, bob = store.create_user("alice"), store.create_user("bob")
    tokens = {"alice": store.create_token(alice.id), "bob": store.create_token(bob.id)}
    with ThreadServer(create_app(settings, store, tiny_engine)) as server:
        server.store, server.tokens = store, tokens
        server.client = lambda who: httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {tokens[who]}"}, timeout=60
        )
        yield server
    store.close()


def test_openai_sdk_talks_to_the_node(node):
    from openai import OpenAI

    client = OpenAI(base_url=node.url + "/v1", api_key=node.tokens["alice"])
    assert "ownlm" in [m.id for m in client.models.list().data]
    history = [{"role": "user", "content": f"remember {MARKER}"}]
    r = client.chat.completions.create(model="ownlm", messages=history, max_tokens=6, temperature=0)
    answer = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 6
    # streaming, continuing the same history: only the new turn is stored
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    chunks = list(client.chat.completions.create(model="ownlm", messages=history, max_tokens=6, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    convs = node.client("alice").get("/api/personalization/conversations").json()
    assert convs["conversations"][0]["messages"] == 4 and convs["totals"]["messages"] == 4
    conv_id = convs["conversations"][0]["id"]
    stored = node.client("alice").get(f"/api/personalization/conversations/{conv_id}").json()["messages"]
    assert [m["content"] for m in stored] == [f"remember {MARKER}", answer, "and then?", streamed]


def test_auth_and_isolation(node):
    anon = httpx.post(node.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert anon.status_code == 401 and "token" in anon.json()["error"]["hint"]
    bad = httpx.get(node.url + "/v1/models", headers={"Authorization": "Bearer olm_forged"})
    assert bad.status_code == 401
    alice, bob = node.client("alice"), node.client("bob")
    r = alice.post("/api/personalization/interactions", json={"messages": [
        {"role": "user", "content": f"alice's {MARKER}"}, {"role": "assistant", "content": "ok"}]}).json()
    conv, reply = r["conversation_id"], r["message_ids"][1]
    assert bob.get(f"/api/personalization/conversations/{conv}").status_code == 404
    assert bob.post("/api/personalization/feedback", json={"message_id": reply, "thumbs": -1}).status_code == 404
    assert bob.delete("/api/personalization/data", params={"conversation_id": conv}).status_code == 404
    assert bob.get("/api/personalization/conversations").json()["totals"]["messages"] == 0
    assert MARKER not in bob.get("/api/personalization/audit").text
    assert alice.get(f"/api/personalization/conversations/{conv}").status_code == 200


def test_interactions_feedback_and_idempotency(node):
    alice = node.client("alice")
    body = {
        "conversation_id": "ide-42",
        "messages": [{"role": "user", "content": "fix my loop"}, {"role": "assistant", "content": "use enumerate"}],
        "context": {"file": "main.py", "language": "python"},
        "feedback": {"thumbs": 1, "edited_content": "use enumerate(xs, start=1)"},
    }
    first = alice.post("/api/personalization/interactions", json=body).json()
    assert first["added"] == 2 and "feedback_id" in first
    second = alice.post("/api/personalization/interactions", json={**body, "feedback": None}).json()
    assert second["added"] == 0 and second["duplicates"] == 2
    fb = alice.post("/api/personalization/feedback", json={"message_id": first["message_ids"][1], "rating": 5})
    assert fb.status_code == 200
    assert node.store.stats(node.store.get_user("alice").id) == {"conversations": 1, "messages": 2, "feedback": 2}


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 422, "JSON"),
        (b'{"messages": "hello"}', 422, "messages"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', 422, "role"),
        (b'{"messages": [{"role": "user", "content": 5}]}', 422, "content"),
        (b'{"messages": []}', 422, "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}], "feedback": {"message_index": 7, "thumbs": 1}}', 422, "message_index"),
    ],
)
def test_bad_interactions_are_clear_and_store_nothing(node, body, status, words):
    r = node.client("alice").post("/api/personalization/interactions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    # the last case is valid up to the feedback: the message is stored only if the whole request is good
    assert node.store.stats(node.store.get_user("alice").id)["messages"] == 0


def test_oversized_body_is_refused(node):
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    r = node.client("alice").post("/api/personalization/interactions", json=big)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["hint"]

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(100):
            yield b"x" * 1024

    r = node.client("alice").post("/api/personalization/interactions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_chat_completion_errors(node):
    alice = node.client("alice")
    r = alice.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "ownlm" in r.json()["error"]["hint"]
    r = alice.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "temperature": 9})
    assert r.status_code == 422 and "temperature" in r.json()["error"]["message"]


def test_websocket_streams_and_records(node):
    url = node.url.replace("http", "ws") + "/ws/chat?token=" + node.tokens["alice"]
    with ws_client.connect(url) as ws:
        ws.send(json.dumps({"content": f"hello {MARKER}", "max_tokens": 5, "temperature": 0}))
        start = json.loads(ws.recv())
        assert start["type"] == "start"
        tokens, event = [], json.loads(ws.recv())
        while event["type"] == "token":
            tokens.append(event["content"])
            event = json.loads(ws.recv())
        assert event["type"] == "done" and event["completion_tokens"] <= 5
        ws.send(json.dumps({"content": "second turn", "conversation_id": start["conversation_id"], "max_tokens": 3}))
        events = [json.loads(ws.recv())]
        while events[-1]["type"] not in ("done", "error"):
            events.append(json.loads(ws.recv()))
        assert events[0]["conversation_id"] == start["conversation_id"] and events[-1]["type"] == "done"
        ws.send("not json")
        assert json.loads(ws.recv())["type"] == "error"  # and the socket stays usable
    stored = node.client("alice").get(f"/api/personalization/conversations/{start['conversation_id']}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["content"] == "".join(tokens)


def test_websocket_rejects_bad_token(node):
    from websockets.exceptions import ConnectionClosed

    url = node.url.replace("http", "ws") + "/ws/chat?token=olm_nope"
    with pytest.raises(ConnectionClosed) as closed:
        with ws_client.connect(url) as ws:
            ws.recv()
    assert closed.value.rcvd.code == 4401  # what a browser can see (a refused handshake reads as 1006)


def test_delete_over_http_leaves_no_plaintext(node, home):
    from tests.sqlcipher_pages import decrypted_pages

    alice = node.client("alice")
    alice.post("/api/personalization/interactions", json={"messages": [{"role": "user", "content": MARKER}]})
    r = alice.delete("/api/personalization/data")
    assert r.status_code == 200 and r.json()["deleted"]["messages"] == 1
    key = (home / "store.key").read_bytes()
    for f in home.rglob("*"):
        if f.is_file():
            assert MARKER.encode() not in f.read_bytes()
    assert not any(MARKER.encode() in p for p in decrypted_pages(home / "store.db", key))
    assert alice.get("/api/personalization/audit").json()["events"][0]["action"] == "deleted"
    r = alice.delete("/api/personalization/data", params={"before": "not-a-date"})
    assert r.status_code == 422
