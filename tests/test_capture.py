"""Idempotent capture after a partial delete, and conversations that share only their opening turns.

Real server on 127.0.0.1 (tiny model), real SQLCipher store in the tmp home.
"""

import json
import time
from datetime import datetime, timezone

import httpx
import pytest

from ownlm.api.app import create_app
from ownlm.settings import load_settings
from ownlm.store import NewMessage, Store
from tests.servers import ThreadServer

CHAT = "/v1/chat/completions"


@pytest.fixture
def node(home, tiny_engine):
    settings = load_settings()
    store = Store(settings.home)
    user = store.create_user("alice")
    token = store.create_token(user.id)
    with ThreadServer(create_app(settings, store, tiny_engine)) as server:
        server.store, server.user, server.token = store, user, token
        server.client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        yield server
    store.close()


def ask(node, history, stream=False) -> tuple[str, dict]:
    """One chat turn; returns (answer, the ownlm ids). A streamed answer must end with [DONE]."""
    body = {"messages": history, "max_tokens": 3, "temperature": 0, "stream": stream}
    if not stream:
        r = node.client.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["ownlm"]
    with node.client.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    chunks = [json.loads(line) for line in lines[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks[-1]["ownlm"]


def stored(node, conversation_id):
    r = node.client.get(f"/api/personalization/conversations/{conversation_id}")
    assert r.status_code == 200, r.text
    return [(m["role"], m["content"]) for m in r.json()["messages"]]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_resend_after_partial_delete(node, stream):
    """Deleting the start of a chat, then re-sending its history: no 500, and the deleted turns stay deleted."""
    history = [{"role": "user", "content": "first question"}]
    a1, _ = ask(node, history)
    time.sleep(0.05)
    cut = time.time()
    time.sleep(0.05)
    history += [{"role": "assistant", "content": a1}, {"role": "user", "content": "second question"}]
    a2, ids = ask(node, history)
    conv = ids["conversation_id"]
    r = node.client.delete("/api/personalization/data", params={"before": iso(cut)})
    assert r.status_code == 200 and r.json()["deleted"]["messages"] == 2
    # every later turn of the same chat re-sends the whole history, the deleted turns included
    for turn in ("third question", "fourth question"):
        history += [{"role": "assistant", "content": a2}, {"role": "user", "content": turn}]
        a2, ids = ask(node, history, stream=stream)
        assert ids["conversation_id"] == conv
    assert stored(node, conv) == [
        ("user", "second question"), ("assistant", history[3]["content"]),
        ("user", "third question"), ("assistant", history[5]["content"]),
        ("user", "fourth question"), ("assistant", a2),
    ]
    assert "first question" not in json.dumps(node.client.get("/api/personalization/conversations").json())
    assert node.store.stats(node.user.id)["messages"] == 6


def test_interactions_resend_after_partial_delete(node):
    """A client's own conversation id, partly deleted, then re-sent longer: stored after what is left."""
    old, new = time.time() - 3600, time.time()
    msgs = [
        {"role": "user", "content": "old q", "timestamp": old}, {"role": "assistant", "content": "old a", "timestamp": old},
        {"role": "user", "content": "new q", "timestamp": new}, {"role": "assistant", "content": "new a", "timestamp": new},
    ]
    first = node.client.post("/api/personalization/interactions", json={"conversation_id": "ide-1", "messages": msgs}).json()
    assert node.client.delete("/api/personalization/data", params={"before": iso(new - 60)}).status_code == 200
    body = {"conversation_id": "ide-1", "messages": msgs + [{"role": "user", "content": "newest q"}]}
    r = node.client.post("/api/personalization/interactions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["conversation_id"] == first["conversation_id"]
    assert out["added"] == 1 and out["duplicates"] == 2 and out["deleted"] == 2
    assert out["message_ids"][:2] == [None, None] and out["message_ids"][2:4] == first["message_ids"][2:4]
    assert stored(node, out["conversation_id"]) == [("user", "new q"), ("assistant", "new a"), ("user", "newest q")]
    # feedback on a message the user deleted is refused, and the request stores nothing
    body["feedback"] = {"message_index": 1, "thumbs": 1}
    r = node.client.post("/api/personalization/interactions", json=body)
    assert r.status_code == 422 and "deleted" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_an_answer_that_cannot_be_stored_still_arrives_whole(node, stream):
    """The store refuses the write (here: its connection turned read-only): the client still gets the whole
    answer, told it was not stored, instead of a 500 or a cut stream."""
    with node.store._lock:
        node.store.db.execute("PRAGMA query_only = ON")
    try:
        answer, ids = ask(node, [{"role": "user", "content": "hi"}], stream=stream)
    finally:
        with node.store._lock:
            node.store.db.execute("PRAGMA query_only = OFF")
    assert answer and ids["error"]["type"] == "StoreError" and "not stored" in ids["error"]["message"], ids
    assert node.store.stats(node.user.id)["messages"] == 0
    assert ask(node, [{"role": "user", "content": "hi"}], stream=stream)[1]["conversation_id"]  # and then it is


def test_two_chats_opening_alike_stay_apart(node):
    """Two new chats that both start with "hello" are two conversations; each continues on its own."""
    one = [{"role": "user", "content": "hello"}]
    two = [{"role": "user", "content": "hello"}]
    a1, ids1 = ask(node, one)
    a2, ids2 = ask(node, two, stream=True)
    assert ids1["conversation_id"] != ids2["conversation_id"]
    one += [{"role": "assistant", "content": a1}, {"role": "user", "content": "tell me about cats"}]
    two += [{"role": "assistant", "content": a2}, {"role": "user", "content": "tell me about dogs"}]
    b1, later1 = ask(node, one)
    b2, later2 = ask(node, two, stream=True)
    # the tiny model answers "hello" the same way both times: the chats are told apart by which one it was
    # asked last (the most recently updated), and each later turn lands in one conversation only
    assert {later1["conversation_id"], later2["conversation_id"]} <= {ids1["conversation_id"], ids2["conversation_id"]}
    convs = node.client.get("/api/personalization/conversations").json()
    assert convs["totals"] == {"conversations": 2, "messages": 8, "feedback": 0}
    for c in convs["conversations"]:
        assert c["messages"] == 4  # no conversation got the other's turns as a branch
        roles = [r for r, _ in stored(node, c["id"])]
        assert roles == ["user", "assistant", "user", "assistant"]


def test_growing_history_folds_into_one_conversation(node):
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]
    answer, ids = ask(node, history)
    for i in range(2, 5):
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"q{i}"}]
        answer, later = ask(node, history, stream=i % 2 == 0)
        assert later["conversation_id"] == ids["conversation_id"]
    assert node.store.stats(node.user.id) == {"conversations": 1, "messages": 9, "feedback": 0}


def test_interactions_without_id(node):
    """No conversation id: an opening without a reply is a new chat each time; a full exchange re-sent is not."""
    post = lambda msgs: node.client.post("/api/personalization/interactions", json={"messages": msgs}).json()  # noqa: E731
    q = [{"role": "user", "content": "hello"}]
    assert post(q)["conversation_id"] != post(q)["conversation_id"]
    x = post(q + [{"role": "assistant", "content": "hi!"}])
    again = post(q + [{"role": "assistant", "content": "hi!"}])
    assert again["added"] == 0 and again["conversation_id"] == x["conversation_id"]
    other = post(q + [{"role": "assistant", "content": "hey"}])  # another chat that opened alike
    assert other["conversation_id"] != x["conversation_id"] and other["added"] == 2


# ---------------------------------------------------------------- the store itself


@pytest.fixture
def store(home):
    s = Store(home)
    yield s
    s.close()


def m(role, content, at=None):
    return NewMessage(role, content, created_at=at)


def test_capture_anchors_on_the_last_stored_message(store):
    u = store.create_user("alice")
    first = store.capture(u.id, [m("user", "a", 10.0), m("assistant", "b", 10.0), m("user", "c"), m("assistant", "d")],
                          source="api", seed="s")
    store.delete_data(u.id, before=100.0)
    again = store.capture(u.id, [m("user", "a"), m("assistant", "b"), m("user", "c"), m("assistant", "d"), m("user", "e")],
                          source="api", seed="s")
    assert again.conversation_id == first.conversation_id
    assert again.message_ids[:4] == [None, None, *first.message_ids[2:]]
    assert (again.added, again.duplicates, again.deleted) == (1, 2, 2)
    # a branch off what is left: a different answer to "c" is a sibling of "d"
    branch = store.capture(u.id, [m("user", "a"), m("assistant", "b"), m("user", "c"), m("assistant", "d2")],
                           source="api", seed="s")
    rows = {r["content"]: r for r in store.get_messages(u.id, first.conversation_id)}
    assert rows["d2"]["parent_id"] == rows["d"]["parent_id"] == first.message_ids[2]
    assert rows["d2"]["position"] == rows["d"]["position"] == 3 and rows["e"]["position"] == 4
    assert branch.added == 1
    # the whole history deleted: nothing is known of it, so it is a conversation again
    store.delete_data(u.id)
    fresh = store.capture(u.id, [m("user", "a"), m("assistant", "b")], source="api", seed="s")
    assert fresh.added == 2 and fresh.deleted == 0


def test_migration_keeps_old_live_conversations_continuable(home):
    """Conversations captured before live threads existed (seed "live") still take their next turn."""
    from ownlm.store.migrations import m008_live_threads

    with Store(home) as s:
        u = s.create_user("alice")
        s.capture(u.id, [m("user", "hi"), m("assistant", "hello")], source="api", seed="live")
        s.capture(u.id, [m("user", "hi"), m("assistant", "imported")], source="import:x", seed="import:x:1")
        # back to the schema before the migration: no thread hashes, the migration not yet run
        for sql in ("DROP INDEX messages_thread", "DROP INDEX messages_parent", "ALTER TABLE messages DROP COLUMN thread_sha256",
                    f"DELETE FROM _migrations WHERE name = '{m008_live_threads.__name__}'"):
            s.db.execute(sql)
    with Store(home) as s:
        assert s.migrations_applied == [m008_live_threads.__name__]
        res = s.capture_live(u.id, [m("user", "hi"), m("assistant", "hello"), m("user", "more"), m("assistant", "ok")],
                             source="api", history=3)
        assert res.added == 2 and res.duplicates == 2 and s.stats(u.id)["conversations"] == 2
        # an imported chat is not a live one, even when it reads the same
        res = s.capture_live(u.id, [m("user", "hi"), m("assistant", "imported"), m("user", "q")], source="api")
        assert res.added == 3 and s.stats(u.id)["conversations"] == 3
        plan = " ".join(str(r) for r in s.query(
            "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE user_id = ? AND thread_sha256 IN (?, ?)", ("u", "a", "b")))
        assert "messages_thread" in plan
