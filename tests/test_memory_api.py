"""Memory at serve time (issue #18) through a real node on 127.0.0.1 and a real SQLCipher store: off by default,
on per user and per request, the passages in the prompt's system message only (never stored, so never in a
dataset a tier may send), the answer naming only the same user's conversations, the audit log counting only.
A recording engine at the model boundary shows what the model was given; the tiny Llama checks the real
tokenizer's path (the base's default system prompt kept, the prompt tokens the block adds)."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets.sync.client as ws_client

from ownlm.api.app import create_app
from ownlm.engine.base import GenerationStream, validate_messages
from ownlm.engine.memory import HEADER
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.servers import ThreadServer

FACT = "my dog is called Biscuit"


class RecordingEngine:
    """The engine protocol without a model: remembers every prompt it was given, answers "ok"."""

    model_name = "fake-base"

    def __init__(self):
        self.prompts: list[list[dict]] = []

    def stream(self, messages, params) -> GenerationStream:
        self.prompts.append(validate_messages(messages))

        def run():
            stream.completion_tokens = 1
            yield "ok"
            stream.finish_reason = "stop"

        stream = GenerationStream(run(), prompt_tokens=sum(len(m["content"].split()) for m in messages))
        return stream


def serve(home, engine, **settings):
    s = load_settings(**settings)
    store = Store(s.home)
    users = {n: store.create_user(n) for n in ("alice", "bob")}
    tokens = {n: store.create_token(u.id) for n, u in users.items()}
    server = ThreadServer(create_app(s, store, engine))
    server.store, server.users, server.tokens, server.engine = store, users, tokens, engine
    server.client = lambda who: httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens[who]}"},
                                             timeout=60)
    return server


@pytest.fixture
def node(home):
    server = serve(home, RecordingEngine())
    with server:
        yield server
    server.store.close()


def remember(client, question: str, answer: str) -> str:
    r = client.post("/api/personalization/interactions",
                    json={"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    assert r.status_code == 200, r.text
    return r.json()["conversation_id"]


def ask(client, text: str, **extra) -> dict:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def system_of(prompt: list[dict]) -> str:
    return prompt[0]["content"] if prompt[0]["role"] == "system" else ""


def test_memory_is_off_by_default_and_a_request_turns_it_on(node):
    alice = node.client("alice")
    past = remember(alice, f"By the way, {FACT}.", "Biscuit is a lovely name.")
    off = ask(alice, "What is my dog's name?")
    assert off["ownlm_memory"] == [] and HEADER not in system_of(node.engine.prompts[-1])
    on = ask(alice, "What is my dog's name?", memory=True)
    assert on["ownlm_memory"] == [{"conversation_id": past, "snippet": f"By the way, {FACT}."}]
    prompt = node.engine.prompts[-1]
    assert prompt[0]["role"] == "system" and HEADER in prompt[0]["content"] and FACT in prompt[0]["content"]
    assert prompt[1:] == [{"role": "user", "content": "What is my dog's name?"}]
    # what is stored is the request as sent, plus the answer: no memory in the user's history
    stored = alice.get(f"/api/personalization/conversations/{on['ownlm']['conversation_id']}").json()["messages"]
    assert [(m["role"], m["content"]) for m in stored] == [("user", "What is my dog's name?"), ("assistant", "ok")]
    # the request's own system message keeps its text, memory follows it
    ask(alice, "dog name?", memory=True, messages=[{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "dog name?"}])
    assert system_of(node.engine.prompts[-1]).startswith(f"Be brief.\n\n{HEADER}")
    # nothing to recall: no system message is added
    assert ask(alice, "hello there", memory=True)["ownlm_memory"] == []
    assert node.engine.prompts[-1][0]["role"] == "user"


def test_a_stream_names_its_memory_in_the_first_chunk(node):
    alice = node.client("alice")
    past = remember(alice, f"Note: {FACT}.", "Noted.")
    with alice.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "my dog's name?"}], "stream": True, "memory": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["ownlm_memory"] == [{"conversation_id": past, "snippet": f"Note: {FACT}."}]
    assert "ownlm" in events[-1] and "ownlm_memory" not in events[-1]


def test_memory_sources_belong_to_the_same_user(node):
    alice, bob = node.client("alice"), node.client("bob")
    mine = {remember(alice, f"{FACT}, he is brown.", "Brown dogs are nice."),
            remember(alice, "my dog likes the beach", "Beaches are fun.")}
    theirs = {remember(bob, "my dog is called Rex, he is black.", "Black dogs are nice.")}
    for who, own, other in ((alice, mine, theirs), (bob, theirs, mine)):
        got = {s["conversation_id"] for s in ask(who, "tell me about my dog", memory=True)["ownlm_memory"]}
        assert got and got <= own and not got & other
        listed = {c["id"] for c in who.get("/api/personalization/conversations").json()["conversations"]}
        assert got <= listed
    assert "Rex" not in system_of(node.engine.prompts[-2]) and "Biscuit" not in system_of(node.engine.prompts[-1])


def test_the_users_setting_and_the_node_default_decide_unless_the_request_does(home):
    server = serve(home, RecordingEngine(), **{"memory": {"enabled": True, "budget_tokens": 300, "passages": 2}})
    with server:
        alice = server.client("alice")
        remember(alice, FACT, "ok")
        state = alice.get("/api/personalization/memory").json()
        assert state == {"enabled": True, "user_setting": None, "node_default": True, "passages": 1, "budget_tokens": 300}
        assert ask(alice, "dog name")["ownlm_memory"]  # the node's default: on
        assert ask(alice, "dog name", memory=False)["ownlm_memory"] == []
        r = alice.post("/api/personalization/memory", json={"enabled": False})
        assert r.status_code == 200 and r.json()["enabled"] is False and r.json()["user_setting"] is False
        assert ask(alice, "dog name")["ownlm_memory"] == []
        assert ask(alice, "dog name", memory=True)["ownlm_memory"]
        assert alice.post("/api/personalization/memory", json={"enabled": None}).json()["enabled"] is True
        for bad in ({"enabled": "yes"}, {"enabled": 1}, {}, {"enabled": True, "extra": 1}):
            assert alice.post("/api/personalization/memory", json=bad).status_code == 422, bad
        r = alice.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "memory": "yes"})
        assert r.status_code == 422
        # bob's setting is his own
        assert server.client("bob").get("/api/personalization/memory").json()["user_setting"] is None
        events = [e for e in alice.get("/api/personalization/audit").json()["events"]]
        changes = [e["detail"] for e in events if e["action"] == "memory_setting_changed"]
        assert changes == [{"old": False, "new": None}, {"old": None, "new": False}]
    server.store.close()


def test_the_audit_log_counts_memory_use_and_holds_no_text(node):
    alice = node.client("alice")
    remember(alice, f"{FACT} and he is 4", "ok")
    remember(alice, "my other dog is called Pip", "ok")
    ask(alice, "my dog's names?", memory=True)
    ask(alice, "hello", memory=True)  # nothing recalled: nothing to record
    used = [e for e in alice.get("/api/personalization/audit").json()["events"] if e["action"] == "memory_used"]
    assert [e["detail"] for e in used] == [{"passages": 2, "conversations": 2}]
    assert "Biscuit" not in json.dumps(alice.get("/api/personalization/audit").json())


def test_the_websocket_recalls_from_other_conversations_and_says_so_at_start(node):
    alice = node.client("alice")
    past = remember(alice, FACT, "A good name.")
    url = node.url.replace("http", "ws") + f"/ws/chat?token={node.tokens['alice']}"
    with ws_client.connect(url) as ws:
        ws.send(json.dumps({"content": "what is my dog called?", "memory": True, "max_tokens": 2}))
        start = json.loads(ws.recv())
        assert start["type"] == "start" and start["memory"] == [{"conversation_id": past, "snippet": FACT}]
        while json.loads(ws.recv())["type"] != "done":
            pass
        assert FACT in system_of(node.engine.prompts[-1])
        # the next turn of this chat: its own first exchange is in the prompt already, and not recalled again
        ws.send(json.dumps({"content": "and what is my dog called again?", "memory": True,
                            "conversation_id": start["conversation_id"], "max_tokens": 2}))
        again = json.loads(ws.recv())
        assert [s["conversation_id"] for s in again["memory"]] == [past]
        while json.loads(ws.recv())["type"] != "done":
            pass
        ws.send(json.dumps({"content": "what is my dog called?", "memory": False, "max_tokens": 2}))
        assert json.loads(ws.recv())["memory"] == []
    used = [e for e in alice.get("/api/personalization/audit").json()["events"] if e["action"] == "memory_used"]
    assert len(used) == 2


def test_memory_never_reaches_what_a_tier_may_send(node, tiny_base):
    """Tier 0 may send a redacted dataset to a remote trainer: that dataset is built from the stored history,
    which never holds the memory block the engine was given."""
    from ownlm.basemodel import load_tokenizer
    from ownlm.learn.dataset import DatasetConfig, build
    from ownlm.privacy.tiers import set_tier

    store, alice = node.store, node.users["alice"]
    set_tier(store, alice, 0, confirm=True)
    client = node.client("alice")
    remember(client, f"{FACT}, remember that", "I will.")
    for i in range(3):
        ask(client, f"what is my dog called? ({i})", memory=True)
    assert all(HEADER in system_of(p) for p in node.engine.prompts[-3:])  # memory was in every prompt
    conversations, feedback = store.training_view(alice.id)
    texts = [m["content"] for c in conversations.values() for m in c]
    assert texts and not any(HEADER in t for t in texts)
    built = build(conversations, feedback, load_tokenizer(load_settings(base=str(tiny_base))),
                  DatasetConfig(min_examples=1, redact=True, paraphrases=0, context_variants=False))
    assert built.examples and not any(HEADER in m["content"] for e in built.examples for m in e.messages)


def test_the_real_tokenizer_keeps_the_default_system_prompt_and_counts_the_block(home, tiny_engine):
    from types import SimpleNamespace

    from ownlm.api.memory import recall

    server = serve(home, tiny_engine)
    with server:
        alice = server.client("alice")
        remember(alice, FACT, "A good name.")
        plain = ask(alice, "what is my dog called?", temperature=0)
        with_memory = ask(alice, "what is my dog called?", temperature=0, memory=True)
        state = SimpleNamespace(settings=load_settings())
        recalled = recall(state, server.store, tiny_engine, server.users["alice"].id,
                          [{"role": "user", "content": "what is my dog called?"}], True)
    server.store.close()
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert recalled.prompt[0]["content"].startswith(default + "\n\n" + HEADER)
    assert 0 < recalled.tokens <= load_settings().memory.budget_tokens
    added = with_memory["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"]
    assert recalled.tokens <= added <= recalled.tokens + 4  # the block, and the blank line before it
