"""Serving under faults (issue 14, item 1): clients that leave, a full line, deadlines, SIGTERM, a busy port.

Real servers on 127.0.0.1 and a real TorchEngine on the tiny random Llama; its forward passes are slowed to
STEP_S and counted (a hook at the model boundary), and it never ends a turn by itself, so only max_tokens,
a deadline or a cancel stop a generation. 400 tokens would hold the engine 20 s: every bound below is far
under that, so a generation that is not stopped fails the test instead of passing slowly.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import websockets
import websockets.sync.client as ws_client

from ownlm.api.app import create_app
from ownlm.basemodel import load_base
from ownlm.engine import TorchEngine
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.servers import ProcessServer, ThreadServer

STEP_S = 0.05
LONG = 400  # tokens: 20 s of engine time at STEP_S
ASK = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def engine(tiny_base):
    engine = TorchEngine(load_base(load_settings(base=str(tiny_base), device="cpu")))
    engine.steps = 0

    def slow(module, args):
        engine.steps += 1
        time.sleep(STEP_S)

    engine.model.register_forward_pre_hook(slow)
    engine._eos_ids = set()  # no end of turn: the random model would otherwise stop whenever it samples one
    return engine


@pytest.fixture
def serve(home, engine):
    """serve(**settings) -> a running node on 127.0.0.1 with user alice; the engine is idle again afterwards."""
    with contextlib.ExitStack() as stack:

        def start(max_waiting: int | None = None, **settings):
            engine.max_waiting = max_waiting
            s = load_settings(**settings)
            store = Store(s.home)
            stack.callback(store.close)
            token = store.create_token(store.create_user("alice").id)
            server = stack.enter_context(ThreadServer(create_app(s, store, engine)))
            server.token = token
            server.client = lambda timeout=30: httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
            return server

        yield start
        assert_engine_idle(engine)  # whatever a test left running has stopped, and the lock is free


def assert_engine_idle(engine, within: float = 5.0) -> int:
    """Wait until no forward pass has run for 0.5 s and the engine lock is free; returns the step count."""
    deadline = time.monotonic() + within
    last, quiet_since = engine.steps, time.monotonic()
    while time.monotonic() - quiet_since < 0.5:
        assert time.monotonic() < deadline, f"the engine is still generating after {within} s"
        time.sleep(0.05)
        if engine.steps != last:
            last, quiet_since = engine.steps, time.monotonic()
    assert engine._lock.acquire(timeout=1), "the engine lock is still held"
    engine._lock.release()
    return last


def chat(max_tokens: int, stream: bool = False, content: str = ASK[0]["content"]) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


def assert_quick_answer(server, within: float = 5.0) -> None:
    """Another client gets a complete answer quickly: the engine is not held by a departed one."""
    t0 = time.monotonic()
    with server.client(timeout=within + 5) as c:
        r = c.post("/v1/chat/completions", json=chat(3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - t0 < within


def test_a_client_dropping_an_sse_stream_frees_the_engine(serve, engine):
    server = serve()
    start = engine.steps
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=chat(LONG, stream=True)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(8))]
        assert any('"content"' in line for line in got)
    # leaving the blocks closed the connection mid-answer
    assert_quick_answer(server)
    assert assert_engine_idle(engine) - start < LONG / 2  # the dropped generation stopped, long before LONG
    with server.client() as c:  # nothing was stored for the client that left; the quick answer was
        assert c.get("/api/personalization/conversations").json()["totals"]["messages"] == 2


def test_a_client_dropping_a_websocket_frees_the_engine(serve, engine):
    server = serve()
    start = engine.steps
    with ws_client.connect(server.url.replace("http", "ws") + "/ws/chat?token=" + server.token) as ws:
        ws.send(json.dumps({"content": "Tell me a long story.", "max_tokens": LONG, "temperature": 0}))
        assert json.loads(ws.recv(timeout=10))["type"] == "start"
        for _ in range(3):
            assert json.loads(ws.recv(timeout=10))["type"] == "token"
    assert_quick_answer(server)
    assert assert_engine_idle(engine) - start < LONG / 2


def test_a_non_streaming_client_that_times_out_stops_its_generation(serve, engine, monkeypatch):
    server = serve()
    start = engine.steps
    with server.client(timeout=1.0) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=chat(LONG))
    steps = assert_engine_idle(engine) - start  # bounded wait: fails if it runs on towards LONG
    assert steps < 2.0 / STEP_S  # ~1 s of generation before the timeout, plus the step that saw the cancel

    # also while its prompt is still being read: 300 words in 8-token chunks would be ~40 forward passes
    monkeypatch.setattr("ownlm.engine.torch_engine.PREFILL_CHUNK", 8)
    start = engine.steps
    with server.client(timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=chat(2, content="word " * 300))
    assert assert_engine_idle(engine) - start < 1.5 / STEP_S


def test_beyond_the_line_the_node_answers_503_with_retry_after(serve, engine):
    server = serve(max_waiting=1)
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=chat(LONG, stream=True)) as running:
        assert running.status_code == 200
        waited: list[httpx.Response] = []

        def wait_in_line() -> None:
            with server.client() as other:
                waited.append(other.post("/v1/chat/completions", json=chat(2)))

        waiter = threading.Thread(target=wait_in_line)
        waiter.start()
        deadline = time.monotonic() + 10
        while engine.waiting < 1:
            assert time.monotonic() < deadline, "the second request never started waiting"
            time.sleep(0.02)
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=chat(2))
        assert time.monotonic() - t0 < 2  # refused at once, not queued
        assert r.status_code == 503 and r.json()["error"]["type"] == "Overloaded"
        assert int(r.headers["Retry-After"]) > 0 and "max_queued_generations" in r.json()["error"]["hint"]
        # a streamed request beyond the line is refused with the same status, before its stream begins
        r = c.post("/v1/chat/completions", json=chat(2, stream=True))
        assert r.status_code == 503 and r.json()["error"]["type"] == "Overloaded"
    waiter.join(timeout=10)  # the running stream was dropped: the one in line is served
    assert waited and waited[0].status_code == 200


def test_the_deadline_ends_an_answer_or_refuses_one_that_cannot_begin(serve, engine, monkeypatch):
    server = serve(generation_timeout_s=1.0)
    with server.client() as c:
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=chat(LONG)).json()
        assert time.monotonic() - t0 < 3
        assert r["choices"][0]["finish_reason"] == "length" and 0 < r["usage"]["completion_tokens"] < LONG / 4
        assert r["choices"][0]["message"]["content"]  # the answer so far is delivered (and stored)

        with engine._lock:  # the engine busy for longer than the deadline (as a long refresh would keep it)
            r = c.post("/v1/chat/completions", json=chat(2))
        assert r.status_code == 503 and "generation_timeout_s" in r.json()["error"]["hint"]

        # a prompt that takes longer than the deadline to read is stopped between prefill chunks
        monkeypatch.setattr("ownlm.engine.torch_engine.PREFILL_CHUNK", 8)
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=chat(2, content="word " * 300))
        assert r.status_code == 503 and "prompt" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 3


def test_closing_the_engine_ends_generations_running_and_waiting(serve, engine):
    """What SIGTERM does first (see the next test): each request in flight gets a clear 503 at once."""
    server = serve(max_waiting=2)
    results: list[httpx.Response] = []

    def ask() -> None:
        with server.client() as c:
            results.append(c.post("/v1/chat/completions", json=chat(LONG)))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.waiting < 1:  # one generates, the other waits in line
            assert time.monotonic() < deadline, "the second request never started waiting"
            time.sleep(0.02)
        t0 = time.monotonic()
        engine.close()
        for t in threads:
            t.join(timeout=5)
        assert time.monotonic() - t0 < 3 and len(results) == 2
        for r in results:
            assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        with server.client() as c:
            assert c.post("/v1/chat/completions", json=chat(2)).status_code == 503
    finally:
        engine._closing = False  # the module's engine serves the other tests


def test_sigterm_stops_serve_during_a_stream(home, tiny_base):
    with Store(home) as s:
        token = s.create_token(s.create_user("alice").id)
    server = ProcessServer(home, "--base", str(tiny_base), "--device", "cpu").start()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        body = chat(4000, stream=True)  # minutes of generation on the tiny model
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c, \
                c.stream("POST", "/v1/chat/completions", json=body) as r, \
                ws_client.connect(server.url.replace("http", "ws") + "/ws/chat?token=" + token) as ws:
            lines = r.iter_lines()
            assert r.status_code == 200 and '"content"' in "".join(line for line, _ in zip(lines, range(6)))
            ws.send(json.dumps({"content": "and you?", "max_tokens": 4000}))  # waits in line behind the stream
            assert json.loads(ws.recv(timeout=10))["type"] == "start"
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            rest = "\n".join(lines)  # the stream ends with an error event, not cut at random
            with contextlib.suppress(websockets.ConnectionClosed):  # closed (1012) or told, either way ended
                assert json.loads(ws.recv(timeout=10))["type"] == "error"
            rc = server.proc.wait(timeout=15)
            took = time.monotonic() - t0
        assert "shutting down" in rest and "[DONE]" not in rest
        # well under uvicorn's graceful timeout (GRACEFUL_SHUTDOWN_S): nothing waited for it
        assert rc == 0 and took < 4, f"exit {rc} after {took:.1f} s"
    finally:
        server.stop()


def test_a_busy_port_is_one_clear_line_and_a_failed_exit(home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "ownlm", "serve", "--no-model", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "ownlm node on" not in p.stdout  # it never claims to be listening
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and "--port" in lines[0] and "OWNLM_PORT" in lines[0]
    assert "Errno" not in p.stderr and "Traceback" not in p.stderr

