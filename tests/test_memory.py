"""The memory index (issue #18) on a real SQLCipher store: kept up to date in the capture's transaction,
redacted, per user, BM25-ranked, safe against FTS5 syntax in the user's text, gone with deleted data (from every
table, FTS5 shadow tables included, and from the database pages), and the prompt template within its budget."""

from __future__ import annotations

import time

import pytest

from ownlm.engine.memory import HEADER, estimate_tokens, memory_block, with_memory
from ownlm.store import NewMessage, Passage, Store
from ownlm.store.memory import MAX_TERMS, match_query, terms
from tests.sqlcipher_pages import decrypted_pages

MARKER = "xylophonezebra7f3a"  # one token, sharing no prefix with the other words: stored whole in the index


def m(role, content, at=None):
    return NewMessage(role, content, at)


@pytest.fixture
def store(home):
    s = Store(home)
    yield s
    s.close()


def chat(store, user, question, answer, seed=None, at=None):
    return store.capture(user.id, [m("user", question, at), m("assistant", answer, at)], source="api",
                         seed=seed or f"t:{question}")


def every_table_text(store) -> str:
    """Every value of every table (FTS5 shadow tables: *_data, *_idx, *_docsize, *_config), blobs decoded
    leniently, as one string: what SQL can see of the database."""
    out = []
    for (name,) in store.query("SELECT name FROM sqlite_master WHERE type = 'table'"):
        for row in store.query(f'SELECT * FROM "{name}"'):
            for v in row:
                out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return "\n".join(out)


def test_a_reply_and_its_question_become_one_passage_in_the_same_transaction(store):
    u = store.create_user("alice")
    res = chat(store, u, "My dog is called Biscuit.", "Biscuit is a fine name for a dog.")
    [p] = store.recall(u.id, "what is my dog's name?")
    assert (p.question, p.answer, p.conversation_id) == ("My dog is called Biscuit.", "Biscuit is a fine name for a dog.",
                                                         res.conversation_id)
    # a question without a reply is no passage; the reply arriving later (the WebSocket's way) makes it one
    q = store.capture(u.id, [m("user", "I live in Utrecht.")], source="ws", seed="ws:1")
    assert store.recall(u.id, "Utrecht") == []
    store.capture(u.id, [m("assistant", "Utrecht has lovely canals.")], source="ws", after=q.message_ids[0])
    assert [p.answer for p in store.recall(u.id, "where do I live? utrecht")] == ["Utrecht has lovely canals."]

    # a capture that fails after its insert leaves no passage behind: one transaction
    def failing(db):
        store.capture(u.id, [m("user", f"remember {MARKER}"), m("assistant", "ok")], source="api", seed="f", db=db)
        raise RuntimeError("after the insert")

    with pytest.raises(RuntimeError):
        store.submit(failing).result()
    assert store.recall(u.id, MARKER) == [] and store.memory_count(u.id) == 2


def test_imports_are_indexed_redacted_and_only_user_assistant_pairs(store):
    from ownlm.capture.importers.base import ImportedConversation, ImportedMessage, ImportResult
    from ownlm.store.imports import import_into

    u = store.create_user("alice")
    conv = ImportedConversation(external_id="x1", title=None, created_at=1.0, messages=[
        ImportedMessage("system", "You are terse."),
        ImportedMessage("user", "mail me at alice@example.com, key sk-proj-abcdefghijklmnopqrstuvwxyz123456"),
        ImportedMessage("assistant", "Noted: alice@example.com."),
        ImportedMessage("assistant", "A second reply to a reply."),  # parent is a reply: no passage
    ])
    import_into(store, u.id, ImportResult("jsonl", [conv]), "x.jsonl")
    [p] = store.recall(u.id, "mail key")
    assert p.question == "mail me at [EMAIL], key [API_KEY]" and p.answer == "Noted: [EMAIL]."
    # the address and the key are in the messages only: neither the passages nor the index know them
    assert store.recall(u.id, "alice example.com sk-proj abcdefghijklmnopqrstuvwxyz123456") == []
    assert not store.query("SELECT 1 FROM memory_passages WHERE question || answer LIKE '%example.com%'")
    assert store.memory_count(u.id) == 1


def test_recall_is_per_user_ranked_and_skips_what_the_prompt_holds(store):
    alice, bob = store.create_user("alice"), store.create_user("bob")
    chat(store, alice, "My cat Miso likes tuna.", "Cats and tuna, a classic.")
    dog = chat(store, alice, "My dog Biscuit likes long walks and my dog Biscuit sleeps a lot.", "Dogs need walks.")
    chat(store, alice, "I walked to the shop.", "Good exercise.")
    chat(store, bob, "My dog Rex likes bones.", "Rex sounds happy.")
    found = store.recall(alice.id, "tell me about my dog")
    assert [p.conversation_id for p in found] == [dog.conversation_id]  # never bob's Rex
    assert [p.question for p in store.recall(bob.id, "dog")] == ["My dog Rex likes bones."]
    walks = store.recall(alice.id, "dog walks")
    assert walks[0].conversation_id == dog.conversation_id and all(a.score <= b.score for a, b in zip(walks, walks[1:]))
    assert store.recall(alice.id, "dog", exclude_conversation=dog.conversation_id) == []
    assert store.recall(alice.id, "dog", exclude_questions=[dog_q := found[0].question]) == [] and dog_q
    # the same exchange stored twice (two chats alike) comes back once
    chat(store, alice, "My cat Miso likes tuna.", "Cats and tuna, a classic.", seed="again")
    assert len(store.recall(alice.id, "miso tuna")) == 1
    assert len(store.recall(alice.id, "my", limit=10)) == 0  # stopwords alone look for nothing
    assert store.recall(alice.id, "walks", limit=0) == []


@pytest.mark.parametrize("text", [
    'dog"', '"dog', 'dog" OR "x', "NEAR(dog name, 2)", "dog AND name", "dog OR", "NOT dog", "dog NOT name",
    "dog*", "*", "name: dog", "question:dog", "answer : biscuit", "{question answer}: dog", "(dog", "dog)", "((()))",
    "^dog", "dog + name", "-dog", "'dog'", "dog\x00name", "\\", ";DROP TABLE memory_fts;--", "dog's name?!",
])
def test_fts5_syntax_in_the_users_text_neither_errors_nor_changes_the_meaning(store, text):
    u = store.create_user("alice")
    chat(store, u, "My dog is called Biscuit.", "A fine name.")
    chat(store, u, "The name of the boat is Anker.", "A sailor's name.")
    found = store.recall(u.id, text)  # no sqlite error, whatever the text
    words, _ = terms(text)
    plain = store.recall(u.id, " ".join(words))  # the same words typed plainly find the same passages
    assert [p.id for p in found] == [p.id for p in plain]
    assert store.memory_count(u.id) == 2  # and nothing was changed


def test_random_text_made_of_fts5_syntax_never_errors(store):
    import random

    u = store.create_user("alice")
    chat(store, u, "My dog is called Biscuit.", "A fine name.")
    rng = random.Random(18)
    pieces = ['"', "'", "*", "^", ":", "(", ")", "{", "}", "+", "-", "NEAR", "AND", "OR", "NOT", "question", "answer",
              "dog", "name", " ", "\t", "\n", "犬", "の", "ชื่อ", "é", "\u0301", "\x00", ",", ";", "\\", "[", "]"]
    for _ in range(300):
        store.recall(u.id, "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))))


def test_query_terms_are_quoted_words_without_stopwords():
    assert terms("What is my dog's name?") == (["dog", "name"], [])
    assert match_query(terms('NEAR("dog" name) AND x*')[0]) == '"dog" OR "name"'
    assert match_query(['a"b']) == '"a""b"' and match_query([]) is None
    assert terms("Room 4 at 10:30") == (["room", "4", "10", "30"], [])
    words, grams = terms("私の犬の名前は何ですか")
    assert words == [] and grams[:3] == ["私の犬", "の犬の", "犬の名"]
    assert len(terms(" ".join(f"w{i}" for i in range(1000)))[0]) == MAX_TERMS


def test_an_empty_history_recalls_nothing_without_error(store):
    u = store.create_user("alice")
    assert store.recall(u.id, "what is my dog's name?") == [] and store.memory_count(u.id) == 0
    assert store.recall(u.id, "") == [] and store.recall(u.id, "   \n") == []
    assert store.recall("user_nobody", "dog") == []


@pytest.mark.parametrize("question, answer, asked, expect", [
    ("私の犬の名前はポチです。", "ポチはいい名前ですね。", "私の犬の名前は何ですか？", "ポチ"),  # Japanese, no spaces
    ("ฉันชื่อสมชายและฉันอาศัยอยู่ที่เชียงใหม่", "เชียงใหม่สวยมาก", "ฉันอาศัยอยู่ที่ไหน", "เชียงใหม่"),  # Thai
    ("我的猫叫小白", "小白是个好名字", "我的猫叫什么名字", "小白"),  # Chinese
])
def test_a_language_written_without_spaces_is_found_by_its_trigrams(store, question, answer, asked, expect):
    u = store.create_user("alice")
    chat(store, u, question, answer)
    chat(store, u, "My dog is called Biscuit.", "A fine name.")
    # unicode61 alone makes the whole sentence one token: the question's words would never match
    assert store.query("SELECT count(*) FROM memory_fts WHERE memory_fts MATCH ?", (f'"{asked.rstrip("？?")}"',))[0][0] == 0
    found = store.recall(u.id, asked)
    assert found and expect in found[0].question + found[0].answer
    # only spaceless passages are in the trigram index (a count(*) would read the content table, so match)
    assert store.query("SELECT count(*) FROM memory_trigram WHERE memory_trigram MATCH '\"Biscuit\"'")[0][0] == 0


@pytest.mark.parametrize("bulk", [False, True], ids=["row by row", "in bulk"])
@pytest.mark.parametrize("scope", ["conversation", "before", "all"])
def test_deleting_conversations_removes_their_passages_from_every_table_and_page(store, home, scope, bulk, monkeypatch):
    import ownlm.store.memory as memory

    # a big delete rebuilds the indexes instead of deleting row by row: both ways must leave nothing
    monkeypatch.setattr(memory, "BULK_MIN", 1 if bulk else 10**9)
    u, other = store.create_user("alice"), store.create_user("bob")
    old = chat(store, u, f"my locker code is {MARKER}", f"I will remember {MARKER}", at=1000.0)
    chat(store, u, "I like sailing.", "Sailing is fun.")  # kept unless everything goes
    chat(store, other, "bob likes sailing too.", "Fair winds.")
    key = (home / "store.key").read_bytes()
    assert any(MARKER in v for v in [every_table_text(store)])
    # the term itself is in the FTS5 b-tree (memory_fts_data): the check below is not vacuous
    assert any(MARKER.encode() in r[0] for r in store.query("SELECT block FROM memory_fts_data") if isinstance(r[0], bytes))
    if scope == "conversation":
        res = store.delete_data(u.id, conversation_id=old.conversation_id)
    elif scope == "before":
        res = store.delete_data(u.id, before=2000.0)
    else:
        res = store.delete_data(u.id)
    assert res["memory_passages"] == (2 if scope == "all" else 1)
    assert store.audit_log(u.id)[0]["detail"]["memory_passages"] == res["memory_passages"]
    assert store.query("SELECT bulk FROM memory_state") == [(0,)]
    assert store.recall(u.id, MARKER) == []
    assert MARKER not in every_table_text(store)  # messages, passages, both FTS5 indexes and their shadow tables
    for page in decrypted_pages(home / "store.db", key):  # and no page of the file (free pages included) or WAL
        assert MARKER.encode() not in page
    assert store.memory_count(u.id) == (0 if scope == "all" else 1) and store.memory_count(other.id) == 1
    assert [p.question for p in store.recall(other.id, "sailing")] == ["bob likes sailing too."]
    rows = store.query("SELECT count(*) FROM memory_fts WHERE memory_fts MATCH 'sailing'")[0][0]
    assert rows == store.query("SELECT count(*) FROM memory_passages WHERE question LIKE '%sailing%'")[0][0]


def test_a_deleted_question_takes_its_passage_along_even_when_the_reply_stays(store):
    u = store.create_user("alice")
    q = store.capture(u.id, [m("user", f"secret {MARKER}", 1000.0)], source="ws", seed="ws:x")
    store.capture(u.id, [m("assistant", "noted", 3000.0)], source="ws", after=q.message_ids[0])
    store.delete_data(u.id, before=2000.0)  # the question goes, its newer reply stays
    assert store.stats(u.id)["messages"] == 1 and store.memory_count(u.id) == 0
    assert MARKER not in every_table_text(store)


def test_plain_fts5_deletes_would_leave_the_terms_behind(store):
    """Why the indexes have secure-delete on: without it a delete leaves the term in the b-tree pages."""
    db = store.db
    db.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    for i in range(20):
        db.execute("INSERT INTO t(rowid, x) VALUES (?, ?)", (i, f"filler words {i}"))
    db.execute("INSERT INTO t(rowid, x) VALUES (99, ?)", (f"my {MARKER}",))
    db.execute("DELETE FROM t WHERE rowid = 99")
    assert any(MARKER.encode() in r[0] for r in db.execute("SELECT block FROM t_data") if isinstance(r[0], bytes))


def test_the_migration_indexes_an_older_store_and_rebuild_matches_it(home):
    from ownlm.store.migrations import m010_memory

    with Store(home) as s:
        u = s.create_user("alice")
        chat(s, u, "My boat is called Anker.", "Anker, a good name.")
        chat(s, u, "Only a question, no reply", "")  # an empty reply still pairs with its question
        s.capture(u.id, [m("user", "dangling question")], source="api", seed="d")
        # back to the schema before the migration
        for sql in ("DROP TABLE memory_fts", "DROP TABLE memory_trigram", "DROP VIEW memory_spaceless",
                    "DROP TABLE memory_passages", "DROP TABLE memory_state", "ALTER TABLE users DROP COLUMN memory",
                    f"DELETE FROM _migrations WHERE name = '{m010_memory.__name__}'"):
            s.db.execute(sql)
    with Store(home) as s:
        assert s.migrations_applied == [m010_memory.__name__]
        assert s.memory_count(u.id) == 2 and s.recall(u.id, "boat name")[0].answer == "Anker, a good name."
        before = s.query("SELECT user_id, conversation_id, question_id, answer_id, question, answer FROM memory_passages")
        assert s.rebuild_memory(u.id) == 2
        assert s.query("SELECT user_id, conversation_id, question_id, answer_id, question, answer FROM memory_passages") == before
        assert s.audit_log(u.id)[0]["action"] == "memory_rebuilt"
        assert s.memory_setting(u.id) is None
        s.set_memory(u.id, True)
        assert s.memory_setting(u.id) is True and s.audit_log(u.id)[0]["detail"] == {"old": None, "new": True}


def test_two_thousand_conversations_recall_the_one_fact(store):
    """A bounded version of bench/memory_scale.py: correctness only, no timing."""
    from ownlm.capture.importers.base import ImportedConversation, ImportedMessage, ImportResult
    from ownlm.store.imports import import_into

    u = store.create_user("alice")
    topics = ["sourdough starter", "tide tables", "dinghy sailing", "python packaging", "train timetables"]
    convs = [ImportedConversation(external_id=f"c{i}", title=None, created_at=float(i), messages=[
        ImportedMessage("user", f"Question {i} about {topics[i % 5]} and my plans for day {i % 30}"),
        ImportedMessage("assistant", f"Here is advice on {topics[i % 5]}, number {i}.")]) for i in range(2000)]
    convs[1234].messages[0] = ImportedMessage("user", "By the way, my dog is called Biscuit.")
    import_into(store, u.id, ImportResult("jsonl", convs), "big.jsonl")
    assert store.memory_count(u.id) == 2000
    found = store.recall(u.id, "What is my dog called?")
    assert found[0].question == "By the way, my dog is called Biscuit."
    assert len(store.recall(u.id, "sourdough starter plans", limit=4)) == 4
    store.delete_data(u.id, conversation_id=found[0].conversation_id)
    assert store.recall(u.id, "dog called") == [] and store.memory_count(u.id) == 1999


# --- the template (engine/memory.py) -------------------------------------------------------------------------

def passage(i: int, q: str = "question", a: str = "answer") -> Passage:
    return Passage(i, f"c{i}", f"{q} {i}", f"{a} {i}", -1.0)


def test_the_block_holds_passages_best_first_within_the_budget():
    block, used = memory_block([passage(1), passage(2)], 200)
    assert used == [passage(1), passage(2)]
    assert block == f"{HEADER}\n[1] User: question 1\n    You: answer 1\n[2] User: question 2\n    You: answer 2"
    long = [passage(i, "word " * 100, "more " * 100) for i in range(10)]
    for budget in (64, 100, 256, 1000):
        block, used = memory_block(long, budget)
        assert estimate_tokens(block) <= budget and used == long[: len(used)] and used
    assert memory_block(long, 10) == ("", [])  # not even the header fits
    assert memory_block([], 256) == ("", [])
    counted = memory_block(long, 120, count_tokens=lambda t: len(t.split()))[0]
    assert len(counted.split()) <= 120 and "…" in counted  # cut to fit, and says so


def test_memory_goes_at_the_end_of_the_system_prompt_and_the_callers_messages_stay():
    msgs = [{"role": "user", "content": "hi"}]
    assert with_memory(msgs, "") == msgs
    assert with_memory(msgs, "MEM", "You are SmolLM.") == [{"role": "system", "content": "You are SmolLM.\n\nMEM"}, *msgs]
    assert with_memory(msgs, "MEM") == [{"role": "system", "content": "MEM"}, *msgs]
    own = [{"role": "system", "content": "Be brief."}, *msgs]
    out = with_memory(own, "MEM", "You are SmolLM.")
    assert out == [{"role": "system", "content": "Be brief.\n\nMEM"}, *msgs] and own[0]["content"] == "Be brief."


def test_recall_takes_milliseconds_on_a_small_history(store):
    """Not a benchmark (bench/memory_scale.py is): a sanity bound that catches a full scan per query."""
    u = store.create_user("alice")
    for i in range(200):
        chat(store, u, f"note {i} about sailing", f"reply {i}")
    t0 = time.perf_counter()
    for _ in range(20):
        store.recall(u.id, "what did I say about sailing?")
    assert (time.perf_counter() - t0) / 20 < 0.5


def test_the_cli_turns_memory_on_searches_and_rebuilds(home):
    from tests.conftest import run_cli

    with Store(home) as s:
        u = s.create_user("alice")
        chat(s, u, "My dog is called Biscuit.", "A fine name.")
    r = run_cli("memory", "show")
    assert r.returncode == 0 and "memory off (the node's default" in r.stdout and "1 passages" in r.stdout, r.stderr
    r = run_cli("memory", "set", "on")
    assert r.returncode == 0 and "memory on (your setting)" in r.stdout, r.stderr
    r = run_cli("memory", "search", 'what is my dog\'s "name" NEAR(*)')
    assert r.returncode == 0 and "user: My dog is called Biscuit." in r.stdout, r.stderr
    r = run_cli("memory", "rebuild")
    assert r.returncode == 0 and "1 passages indexed" in r.stdout
    with Store(home) as s:
        assert s.memory_setting(u.id) is True
        assert [e["action"] for e in s.audit_log(u.id)][:2] == ["memory_rebuilt", "memory_setting_changed"]
