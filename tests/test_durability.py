"""Acknowledged = durable: `kill -9` of a real `ownlm serve` process loses no acknowledged message."""

import threading

import httpx

from ownlm.store import Store
from tests.servers import ProcessServer


def test_kill9_loses_no_acknowledged_message(home):
    with Store(home) as s:
        token = s.create_token(s.create_user("alice").id)
    headers = {"Authorization": f"Bearer {token}"}
    server = ProcessServer(home, "--no-model").start()
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(n: int) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as c:
            i = 0
            while not stop.is_set():
                text = f"writer {n} message {i}"
                try:
                    r = c.post("/api/personalization/interactions", json={"messages": [{"role": "user", "content": text}]})
                except httpx.HTTPError:
                    return  # the server died under us: this one was never acknowledged
                if r.status_code == 200:
                    with lock:
                        acked.append(text)
                i += 1

    try:
        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 200:  # bounded: 4 writers, stops at the kill
            threading.Event().wait(0.01)
        server.kill9()  # mid-stream: requests are in flight
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        stop.set()
        server.stop()
    with Store(home) as s:
        assert s.query("PRAGMA integrity_check")[0][0] == "ok"
        stored = {r[0] for r in s.query("SELECT content FROM messages")}
    missing = [m for m in acked if m not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    assert len(acked) >= 200

    # the node starts again on the same store and keeps serving
    again = ProcessServer(home, "--no-model").start()
    try:
        r = httpx.get(again.url + "/api/personalization/conversations", headers=headers)
        assert r.json()["totals"]["messages"] >= len(acked)
    finally:
        again.stop()
