"""`ownlm serve` on the llama.cpp engine (issue 17 items 1 and 2): which engine settings.engine = "auto" picks, a
real node on 127.0.0.1 answering two users with their own adapters, and hot deploy: installs and rollbacks (over
the API, and by another process) served from the next request on, never by a stale or another user's adapter.

All on the tiny random Llama as an F32 GGUF (tests/tiny_gguf.py), llama.cpp on one thread. The expected answers
come from a LlamaEngine in this process loaded with the same deltas: greedy and F32, so text identifies the model.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from ownlm.artifact.bundle import make_bundle
from ownlm.basemodel import checkpoint_dir, resolve_base
from ownlm.bitdelta import load_delta
from ownlm.bitdelta.gguf_lora import write_gguf_lora
from ownlm.cli import cli
from ownlm.engine import GenerationParams
from ownlm.engine.llama import LlamaEngine
from ownlm.engine.serving import choose_engine
from ownlm.node.install import install
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.conftest import make_tiny_delta, run_cli
from tests.servers import ProcessServer
from tests.test_llama_engine import gguf_delta
from tests.tiny_gguf import place_conversion, write_tiny_gguf

Q = [{"role": "user", "content": "Tell me something about the sea."}]
MAX_TOKENS = 12
VERSIONS = {"alice": {1: "a1", 2: "a2"}, "bob": {1: "b1", 2: "b2"}}  # user -> version -> delta


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory):
    """The tiny GGUF; a home holding its conversion cache (where `ownlm serve` reads the tokenizer); four deltas
    relabelled for the GGUF; each model's greedy answer to Q (None: the base)."""
    root = tmp_path_factory.mktemp("serve-llama")
    gguf = write_tiny_gguf(tiny_base, root / "tiny.gguf")
    seed_home = root / "seed-home"
    directory = place_conversion(tiny_base, gguf, seed_home)
    _, sha, cached = checkpoint_dir(resolve_base(str(gguf)), seed_home)
    assert cached
    deltas = {}
    for seed, name in enumerate(("a1", "a2", "b1", "b2"), start=1):
        made = make_tiny_delta(tiny_base, root / f"made-{name}", seed=seed, scale=30.0)
        deltas[name] = gguf_delta(made, sha, root / name)
    adapters = {name: write_gguf_lora(load_delta(d / "delta"), gguf, root / f"{name}.gguf") for name, d in deltas.items()}
    tok = AutoTokenizer.from_pretrained(str(directory))
    engine = LlamaEngine(gguf, tok, "tiny", adapters=adapters, threads=1)
    # answered as the node serves a request that sets no repetition penalty of its own
    greedy = GenerationParams(max_tokens=MAX_TOKENS, temperature=0,
                              repetition_penalty=load_settings().repetition_penalty)
    want = {name: engine.stream(Q, greedy, adapter=name).text() for name in (None, *deltas)}
    assert len(set(want.values())) == len(want)  # five models, five answers: an answer names its model
    return {"gguf": gguf, "seed_home": seed_home, "deltas": deltas, "want": want}


@pytest.fixture
def node(world, home, monkeypatch):
    """This test's home with the tokenizer cache, users alice and bob with tokens and bundles v1, v2 each."""
    shutil.copytree(world["seed_home"] / "cache", home / "cache")
    monkeypatch.setenv("OWNLM_THREADS", "1")
    monkeypatch.setenv("OWNLM_PERSONALIZATION__ENABLED", "false")  # no learning round beside the test
    settings = load_settings(base=str(world["gguf"]), device="cpu")
    users = {}
    with Store(home) as store:
        for name, versions in VERSIONS.items():
            user = store.create_user(name)
            bundles = {v: bundle(store, user, world["deltas"][d], v) for v, d in versions.items()}
            users[name] = {"id": user.id, "token": store.create_token(user.id), "bundles": bundles, "models": {}}
    return settings, users


def bundle(store, user, delta_root: Path, version: int) -> bytes:
    data, _ = make_bundle(delta_dir=delta_root / "delta", report=json.loads((delta_root / "report.json").read_text()),
                          user_name=user.name, signing_key=store.signing_key(user.id),
                          recipient=store.node_key().public_json(), base_name="tiny", version=version, previous=None,
                          created_at=1_790_000_000 + version * 3600)
    return data


def install_v1(home, settings, users) -> None:
    with Store(home) as store:
        for name, u in users.items():
            u["models"][install(store, settings, u["bundles"][1]).model_id] = VERSIONS[name][1]


def ask(url: str, token: str, stream: bool, model: str | None = None) -> tuple[str, str]:
    """(answer, stored model) of one greedy chat completion; the stored model is the one the node recorded as
    having written the answer (a model id or the base's name)."""
    auth = {"Authorization": f"Bearer {token}"}
    body = {"messages": Q, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream, **({"model": model} if model else {})}
    if stream:
        parts, ids = [], None
        with httpx.stream("POST", url + "/v1/chat/completions", headers=auth, json=body, timeout=60) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    parts.append(event["choices"][0]["delta"].get("content") or "")
                    ids = event.get("ownlm", ids)
        text = "".join(parts)
    else:
        r = httpx.post(url + "/v1/chat/completions", headers=auth, json=body, timeout=60)
        assert r.status_code == 200, r.text
        text, ids = r.json()["choices"][0]["message"]["content"], r.json()["ownlm"]
    messages = httpx.get(url + f"/api/personalization/conversations/{ids['conversation_id']}", headers=auth,
                         timeout=30).json()["messages"]
    return text, next(m["model"] for m in messages if m["id"] == ids["message_id"])


def answered(world, users, name: str, text: str, stored: str) -> str | None:
    """Which of `name`'s models wrote `text` (a delta name, None for the base), checked against what was stored."""
    mine = {world["want"][d]: d for d in VERSIONS[name].values()} | {world["want"][None]: None}
    assert text in mine, f"{name} got an answer none of their models gives (another user's?): {text!r}"
    recorded = None if stored == "tiny" else users[name]["models"][stored]  # "tiny": the base's name
    assert recorded == mine[text], (name, stored, text)
    return mine[text]


def test_auto_picks_llama_for_a_gguf_base_on_the_cpu(world, tiny_base, monkeypatch):
    gguf = str(world["gguf"])
    assert load_settings().engine == "auto"
    assert choose_engine(load_settings(base=gguf, device="cpu")).name == "llama"
    hf = choose_engine(load_settings(base=str(tiny_base), device="cpu"))
    assert hf.name == "torch" and "checkpoint directory" in hf.reason
    assert choose_engine(load_settings(base=gguf, device="cpu", engine="torch")).name == "torch"
    assert choose_engine(load_settings(base=str(tiny_base), engine="llama")).name == "llama"  # asked for: its error says why
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = choose_engine(load_settings(base=gguf))
    assert gpu.name == "torch" and "CUDA" in gpu.reason
    assert choose_engine(load_settings(base=gguf, device="cpu")).name == "llama"  # the device setting decides
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # as if not installed
    missing = choose_engine(load_settings(base=gguf, device="cpu"))
    assert missing.name == "torch" and "pip install xllamacpp" in missing.reason


def test_info_says_which_engine_serves_and_why(world):
    runner = CliRunner()
    llama = runner.invoke(cli, ["info", "--no-load", "--base", str(world["gguf"]), "--device", "cpu"])
    assert llama.exit_code == 0, llama.output
    assert "llama (auto: a GGUF base on the CPU" in " ".join(llama.output.split())
    torch_ = runner.invoke(cli, ["info", "--no-load", "--base", str(world["gguf"]), "--engine", "torch"])
    assert "torch (engine = torch in the settings)" in " ".join(torch_.output.split())


def test_chat_answers_with_the_llama_engine(world, node, home, monkeypatch):
    settings, users = node
    install_v1(home, settings, users)

    def no_torch(*args, **kwargs):
        raise AssertionError("ownlm chat loaded the torch engine's base")

    monkeypatch.setattr("ownlm.basemodel.load_base", no_torch)
    args = ["chat", "--base", str(world["gguf"]), "--device", "cpu", "--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
    for name, want in (("alice", "a1"), ("bob", "b1")):
        result = CliRunner().invoke(cli, [*args, "--user", name, Q[0]["content"]])
        assert result.exit_code == 0, result.output
        assert result.output == world["want"][want] + "\n"
    base = CliRunner().invoke(cli, [*args, "--user", "alice", "--base-model", Q[0]["content"]])
    assert base.output == world["want"][None] + "\n"


def test_serve_answers_each_user_with_their_adapter(world, node, home):
    settings, users = node
    install_v1(home, settings, users)
    srv = ProcessServer(home, "--base", str(world["gguf"]), "--device", "cpu").start()  # engine: auto
    try:
        for stream in (False, True):
            for name in users:
                text, stored = ask(srv.url, users[name]["token"], stream)
                assert answered(world, users, name, text, stored) == VERSIONS[name][1], (name, stream)
            text, stored = ask(srv.url, users["alice"]["token"], stream, model="tiny")  # the base by name
            assert text == world["want"][None] and stored == "tiny"
    finally:
        srv.stop()
    banner = " ".join(srv.proc.stdout.read().split())
    assert "on llama (auto: a GGUF base on the CPU" in banner, banner


def test_hot_deploy_while_two_users_stream(world, node, home):
    """Installs and rollbacks over the API while alice and bob keep asking (streaming and not): every answer is
    the asker's own model's; one asked after a switch returned (and done before the next began) is the new one."""
    settings, users = node
    install_v1(home, settings, users)
    srv = ProcessServer(home, "--base", str(world["gguf"]), "--device", "cpu", "--engine", "llama").start()
    # (user, what the API is asked, the delta then serving them)
    switches = [("alice", ("deploy", 2), "a2"), ("bob", ("rollback", "base"), None), ("bob", ("deploy", 2), "b2"),
                ("alice", ("rollback", "1"), "a1"), ("bob", ("rollback", "1"), "b1")]
    log: dict[str, list] = {name: [] for name in users}  # (sent, done, delta that answered)
    events: dict[str, list] = {name: [(0.0, 0.0, VERSIONS[name][1])] for name in users}  # (began, returned, delta)
    stop, failures, last = threading.Event(), [], [0.0]  # last: when the latest switch returned

    def client(name: str) -> None:
        n = 0
        try:
            while not stop.is_set() and n < 400:
                sent = time.monotonic()
                text, stored = ask(srv.url, users[name]["token"], stream=n % 2 == 0)
                log[name].append((sent, time.monotonic(), answered(world, users, name, text, stored)))
                n += 1
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    def served_after(t: float) -> bool:
        return all(sum(sent > t for sent, _, _ in log[name]) >= 2 for name in users) or bool(failures)

    threads = [threading.Thread(target=client, args=(name,), daemon=True) for name in users]
    try:
        for t in threads:
            t.start()
        for name, (action, arg), delta in switches:
            wait_until(lambda: served_after(last[0]))
            u, began = users[name], time.monotonic()
            auth = {"Authorization": f"Bearer {u['token']}"}
            if action == "deploy":
                r = httpx.post(srv.url + "/api/personalization/deploy", content=u["bundles"][arg], headers=auth, timeout=60)
                assert r.status_code == 200, r.text
                u["models"][r.json()["model_id"]] = delta
            else:
                r = httpx.post(srv.url + "/api/personalization/rollback", json={"target": arg}, headers=auth, timeout=60)
                assert r.status_code == 200, r.text
            last[0] = time.monotonic()
            events[name].append((began, last[0], delta))
        wait_until(lambda: served_after(last[0]))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        srv.stop()
    if failures:
        raise failures[0]
    for name in users:
        assert len(log[name]) >= 2 * len(events[name])
        for sent, done, got in log[name]:
            # the switches of this user that may have been served: the last one returned before it was sent,
            # and any that began before it was answered
            last = max(i for i, (_, returned, _) in enumerate(events[name]) if returned < sent)
            allowed = {d for i, (began, _, d) in enumerate(events[name]) if i == last or (i > last and began < done)}
            assert got in allowed, (name, got, allowed)


def test_serve_follows_rollback_and_deploy_run_by_another_process(world, node, home, tmp_path):
    """`ownlm rollback` and `ownlm deploy` in a shell while `ownlm serve` (llama.cpp) runs: the very next request
    after the command returns is answered by the model it routed."""
    settings, users = node
    alice = users["alice"]
    with Store(home) as store:
        alice["models"][install(store, settings, alice["bundles"][1]).model_id] = "a1"
    (tmp_path / "v2.ownlm").write_bytes(alice["bundles"][2])
    srv = ProcessServer(home, "--base", str(world["gguf"]), "--device", "cpu", "--engine", "llama").start()
    env = {"OWNLM_HOME": str(home), "OWNLM_BASE": str(world["gguf"]), "OWNLM_USER": "alice"}
    try:
        assert answered(world, users, "alice", *ask(srv.url, alice["token"], stream=False)) == "a1"
        r = run_cli("rollback", "base", env=env)
        assert r.returncode == 0, r.stderr
        assert answered(world, users, "alice", *ask(srv.url, alice["token"], stream=True)) is None
        r = run_cli("deploy", str(tmp_path / "v2.ownlm"), env=env)
        assert r.returncode == 0, r.stderr
        with Store(home) as store:
            alice["models"][store.active_model(alice["id"])["id"]] = "a2"
        assert answered(world, users, "alice", *ask(srv.url, alice["token"], stream=False)) == "a2"
        assert answered(world, users, "bob", *ask(srv.url, users["bob"]["token"], stream=True)) is None  # never installed
    finally:
        srv.stop()


def wait_until(done, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)
