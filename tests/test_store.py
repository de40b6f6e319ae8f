import os
import stat
import time

import pytest

from ownlm.errors import AuthError, InvalidInput, NotFound, StoreError, WrongPassphrase
from ownlm.store import NewMessage, Store
from ownlm.store.migrations import MIGRATIONS
from tests.sqlcipher_pages import decrypted_pages

MARKER = "MARKER-7f3a9c-zebra-quartz"


def msgs(*pairs):
    return [NewMessage(r, c) for r, c in pairs]


@pytest.fixture
def store(home):
    s = Store(home)
    yield s
    s.close()


def test_blank_database_gets_every_migration(home):
    with Store(home) as s:
        assert s.migrations_applied == [m.__name__ for m in MIGRATIONS]
        tables = {r[0] for r in s.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"users", "tokens", "conversations", "messages", "feedback", "audit", "_migrations"} <= tables
        assert s.query("PRAGMA journal_mode")[0][0] == "wal"
    with Store(home) as s:  # reopening runs nothing again
        assert s.migrations_applied == []


def test_file_is_encrypted_and_private(store, home):
    u = store.create_user("alice")
    store.capture(u.id, msgs(("user", MARKER)), source="api", seed="live")
    assert not (home / "store.db").read_bytes().startswith(b"SQLite format 3")
    for f in home.iterdir():
        assert MARKER.encode() not in f.read_bytes()
    assert stat.S_IMODE(os.stat(home / "store.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home / "store.db").st_mode) == 0o600
    # ...yet the text is there for whoever holds the key: the check above is not vacuous
    pages = decrypted_pages(home / "store.db", (home / "store.key").read_bytes())
    assert any(MARKER.encode() in p for p in pages)


def test_passphrase_protection(home):
    with Store(home, passphrase="correct horse") as s:
        s.create_user("alice")
    assert (home / "store.key.json").exists() and not (home / "store.key").exists()
    with pytest.raises(WrongPassphrase, match="does not unlock"):
        Store(home, passphrase="wrong horse")
    with pytest.raises(WrongPassphrase, match="protected by a passphrase"):
        Store(home)
    with Store(home, passphrase="correct horse") as s:
        assert s.get_user("alice").name == "alice"
        s.protect_key(None)  # back to a key file, same key, data kept
    with Store(home) as s:
        assert s.get_user("alice").name == "alice"


def test_missing_or_wrong_key_is_clear(home):
    with Store(home) as s:
        s.create_user("alice")
    key = (home / "store.key").read_bytes()
    (home / "store.key").write_bytes(bytes(32))
    with pytest.raises(WrongPassphrase, match="does not open"):
        Store(home)
    (home / "store.key").unlink()
    with pytest.raises(StoreError, match="key file is missing"):
        Store(home)
    (home / "store.key").write_bytes(key)
    with Store(home) as s:  # nothing was lost by the failed attempts
        assert s.get_user("alice")


def test_capture_is_idempotent_and_extends_history(store):
    u = store.create_user("alice")
    a = store.capture(u.id, msgs(("user", "hi"), ("assistant", "hello")), source="api", seed="live")
    assert a.added == 2
    again = store.capture(u.id, msgs(("user", "hi"), ("assistant", "hello")), source="api", seed="live")
    assert again.added == 0 and again.duplicates == 2 and again.message_ids == a.message_ids
    longer = store.capture(u.id, msgs(("user", "hi"), ("assistant", "hello"), ("user", "more")), source="api", seed="live")
    assert longer.added == 1 and longer.conversation_id == a.conversation_id
    # another seed is another namespace: same words, separate conversation
    other = store.capture(u.id, msgs(("user", "hi")), source="import:x", seed="import:x:42")
    assert other.added == 1 and other.conversation_id != a.conversation_id
    thread = store.thread(u.id, longer.message_ids[-1])
    assert [m["content"] for m in thread] == ["hi", "hello", "more"]


def test_branch_and_continue_after(store):
    u = store.create_user("alice")
    a = store.capture(u.id, msgs(("user", "q"), ("assistant", "a1")), source="api", seed="live")
    b = store.capture(u.id, msgs(("user", "q"), ("assistant", "a2")), source="api", seed="live")  # regenerated
    assert b.conversation_id == a.conversation_id and b.added == 1
    c = store.capture(u.id, msgs(("user", "follow-up")), source="ws", after=b.message_ids[-1])
    assert [m["content"] for m in store.thread(u.id, c.message_ids[0])] == ["q", "a2", "follow-up"]
    assert len(store.get_messages(u.id, a.conversation_id)) == 4


def test_users_are_isolated(store):
    alice, bob = store.create_user("alice"), store.create_user("bob")
    a = store.capture(alice.id, msgs(("user", "secret"), ("assistant", "ok")), source="api", seed="live")
    with pytest.raises(NotFound):
        store.get_messages(bob.id, a.conversation_id)
    with pytest.raises(NotFound):
        store.add_feedback(bob.id, a.message_ids[1], thumbs=-1)
    with pytest.raises(NotFound):
        store.delete_data(bob.id, conversation_id=a.conversation_id)
    with pytest.raises(NotFound):
        store.capture(bob.id, msgs(("user", "x")), source="ws", after=a.message_ids[1])
    assert store.stats(alice.id)["messages"] == 2 and store.stats(bob.id)["messages"] == 0


def test_tokens(store):
    u = store.create_user("alice")
    t = store.create_token(u.id, "laptop")
    assert store.user_for_token(t) == u
    assert not store.query("SELECT 1 FROM tokens WHERE token_sha256 = ?", (t,))  # only the hash is stored
    with pytest.raises(AuthError):
        store.user_for_token("olm_nope")
    store.revoke_tokens(u.id)
    with pytest.raises(AuthError, match="revoked"):
        store.user_for_token(t)


def test_bad_input(store):
    u = store.create_user("alice")
    with pytest.raises(InvalidInput):
        store.create_user("alice")
    with pytest.raises(InvalidInput):
        store.create_user("no spaces allowed")
    with pytest.raises(InvalidInput, match="role"):
        store.capture(u.id, msgs(("tool", "x")), source="api", seed="live")
    with pytest.raises(InvalidInput):
        store.capture(u.id, [], source="api", seed="live")
    a = store.capture(u.id, msgs(("user", "q"), ("assistant", "a")), source="api", seed="live")
    with pytest.raises(InvalidInput, match="assistant"):
        store.add_feedback(u.id, a.message_ids[0], edited_content="better question")
    with pytest.raises(InvalidInput):
        store.add_feedback(u.id, a.message_ids[1], rating=9)
    assert store.stats(u.id) == {"conversations": 1, "messages": 2, "feedback": 0}


def test_feedback(store):
    u = store.create_user("alice")
    a = store.capture(u.id, msgs(("user", "q"), ("assistant", "a")), source="api", seed="live")
    store.add_feedback(u.id, a.message_ids[1], thumbs=1, rating=4, edited_content="a, but better")
    assert store.stats(u.id)["feedback"] == 1


def test_delete_before_and_one_conversation(store):
    u = store.create_user("alice")
    old = store.capture(u.id, [NewMessage("user", "old", created_at=1000.0)], source="api", seed="s1")
    mixed = store.capture(
        u.id, [NewMessage("user", "old too", created_at=1000.0), NewMessage("assistant", "new", created_at=time.time())],
        source="api", seed="s2",
    )
    keep = store.capture(u.id, msgs(("user", "keep me")), source="api", seed="s3")
    res = store.delete_data(u.id, before=2000.0)
    assert res["messages"] == 2 and res["conversations"] == 1
    with pytest.raises(NotFound):
        store.get_messages(u.id, old.conversation_id)
    assert [m["content"] for m in store.get_messages(u.id, mixed.conversation_id)] == ["new"]
    store.delete_data(u.id, conversation_id=keep.conversation_id)
    assert store.stats(u.id)["conversations"] == 1


def test_delete_all_leaves_no_plaintext_anywhere(store, home):
    u = store.create_user("alice")
    r = store.capture(u.id, msgs(("user", f"my secret is {MARKER}"), ("assistant", f"noted: {MARKER}")), source="api", seed="live")
    store.add_feedback(u.id, r.message_ids[1], edited_content=f"better {MARKER}")
    key = (home / "store.key").read_bytes()
    assert any(MARKER.encode() in p for p in decrypted_pages(home / "store.db", key))
    res = store.delete_data(u.id)
    assert res["messages"] == 2
    # no file under the home holds the marker, and neither does any decrypted page of the db or its WAL
    for f in home.rglob("*"):
        if f.is_file():
            assert MARKER.encode() not in f.read_bytes(), f
    for page in decrypted_pages(home / "store.db", key):
        assert MARKER.encode() not in page
    events = store.audit_log(u.id)
    assert events[0]["action"] == "deleted" and events[0]["detail"]["messages"] == 2
    assert MARKER not in str(events)


def test_group_commit_isolates_a_failing_job(store):
    import threading

    u = store.create_user("alice")
    gate = threading.Event()
    blocker = store.submit(lambda db: gate.wait(5))  # holds the writer so the next jobs form one batch
    futures = [
        store.submit(lambda db, i=i: store.capture(u.id, msgs(("user", f"m{i}")), source="api", seed=f"s{i}", db=db).added)
        for i in range(5)
    ]
    bad = store.submit(lambda db: store.capture(u.id, msgs(("robot", "x")), source="api", seed="bad", db=db))
    gate.set()
    blocker.result(timeout=10)
    assert [f.result(timeout=10) for f in futures] == [1] * 5
    with pytest.raises(InvalidInput):
        bad.result(timeout=10)
    assert store.stats(u.id)["messages"] == 5


def test_conversation_list_previews_the_first_user_message(store):
    u = store.create_user("alice")
    long = "How   do I\nmake sourdough " + "bread " * 40
    store.capture(u.id, [NewMessage("system", "be nice"), NewMessage("user", long), NewMessage("assistant", "flour")],
                  source="test", seed="a")
    store.capture(u.id, [NewMessage("user", "hi")], source="test", seed="b", title="Greetings")
    store.capture(u.id, [NewMessage("assistant", "a reply with no question")], source="test", seed="c")
    rows = {r["title"] or r["preview"]: r for r in store.list_conversations(u.id)}
    untitled = rows[next(k for k in rows if k and k.startswith("How do I"))]
    assert untitled["title"] is None and untitled["messages"] == 3
    assert untitled["preview"].startswith("How do I make sourdough bread bread")  # whitespace folded
    assert len(untitled["preview"]) <= 80 and untitled["preview"].endswith("…")
    assert rows["Greetings"]["preview"] == "hi"
    assert [r["preview"] for r in store.list_conversations(u.id) if r["messages"] == 1 and not r["title"]] == [None]
