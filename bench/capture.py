"""Capture throughput over HTTP into the encrypted store, with concurrent clients, and a lost-message count.

Starts a real `ownlm serve --no-model` on 127.0.0.1 with a fresh home (SQLCipher on, synchronous=FULL),
then C concurrent clients POST /api/personalization/interactions, each request carrying a conversation of
M messages, for a bounded number of requests. Afterwards the store is opened and every message counted.

    .venv/bin/python bench/capture.py [--clients 16] [--requests 2000] [--messages-per-request 10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ownlm.store import Store  # noqa: E402
from tests.servers import ProcessServer  # noqa: E402


async def run_clients(url: str, token: str, clients: int, requests: int, per_request: int) -> tuple[int, list[float]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    latencies: list[float] = []
    ok = 0

    async def client(n: int) -> None:
        nonlocal ok
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                msgs = [
                    {"role": "user" if k % 2 == 0 else "assistant", "content": f"conversation {i} turn {k}: " + "lorem ipsum " * 20}
                    for k in range(per_request)
                ]
                t0 = time.perf_counter()
                r = await c.post("/api/personalization/interactions", json={"conversation_id": f"bench-{i}", "messages": msgs})
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                ok += 1

    await asyncio.gather(*(client(n) for n in range(clients)))
    return ok, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--messages-per-request", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        with Store(home) as s:
            token = s.create_token(s.create_user("bench").id)
        server = ProcessServer(home, "--no-model").start()
        try:
            t0 = time.perf_counter()
            ok, lat = asyncio.run(run_clients(server.url, token, args.clients, args.requests, args.messages_per_request))
            elapsed = time.perf_counter() - t0
        finally:
            server.stop()
        with Store(home) as s:
            stored = s.query("SELECT count(*) FROM messages")[0][0]
    sent = ok * args.messages_per_request
    lat.sort()
    print(f"clients={args.clients} requests={ok} messages/request={args.messages_per_request} encryption=SQLCipher synchronous=FULL")
    print(f"elapsed: {elapsed:.2f} s")
    print(f"requests/s: {ok / elapsed:.0f}   latency p50 {lat[len(lat) // 2] * 1000:.1f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms")
    print(f"messages/s: {sent / elapsed:.0f}")
    print(f"acknowledged messages: {sent}, stored: {stored}, lost: {sent - stored}")
    if stored != sent:
        sys.exit(1)


if __name__ == "__main__":
    main()
