"""How many users' adapters one llama.cpp replica should hold (settings.max_adapters_per_replica; issue 19, item 4).

A node with U users, each with an installed personal model (lora1 q/v r8 on the embedded base), served by the
llama engine with at most C adapters per replica (C = U: one replica holds all). For each C, measured in one
process on the same users: the cost of one deploy (a sealed bundle for one user received -> install -> refresh,
which rebuilds that user's replica -> first token of the new version), decode tokens/s of a personal answer
with that many adapters loaded beside it, the process's resident memory after the engine is built, and
the start-up time (every replica built). Deploys rotate over the users; medians over --deploys rounds.

With --ray, also the floor of what serving through Ray (Ray Serve's model multiplexing runs each replica as
a Ray actor) adds to a streamed answer: a local Ray actor that yields --tokens items to the caller, per item,
against the same loop in process. Ray Serve itself (HTTP proxy, router) would add more; it is not installed.

    OWNLM_HOME=... .venv/bin/python bench/replicas.py [--users 48] [--capacities 48,16,4] [--deploys 5] [--ray]
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from serve_overhead import PROMPT, bundle, make_delta, node, timed  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.engine import GenerationParams  # noqa: E402
from ownlm.engine.llama import load_llama_engine  # noqa: E402
from ownlm.node.install import install  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402


def rss_mib() -> float:
    """This process's resident memory now, MiB (Linux /proc; ru_maxrss is the peak, not the present)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_capacity(s, store, capacity: int, deltas: list[Path], base_name: str, rounds: int, tokens: int) -> dict:
    users = store.list_users()
    before = rss_mib()
    t0 = time.perf_counter()
    engine = load_llama_engine(s.model_copy(update={"max_adapters_per_replica": capacity}), store)
    startup = time.perf_counter() - t0
    try:
        memory = rss_mib() - before
        replicas = len(engine.replicas)
        speeds = [timed(engine, tokens, user_id=users[i % len(users)].id)[1] for i in range(3)]
        deploys = []
        for r in range(rounds):
            user = users[(r * 7) % len(users)]
            data = bundle(store, user, deltas[r % len(deltas)], base_name, store.max_version(user.id) + 1)
            t0 = time.perf_counter()
            res = install(store, s, data, keep=2)
            engine.refresh(user.id)
            stream = engine.stream(PROMPT, GenerationParams(max_tokens=1, temperature=0), user_id=user.id)
            next(iter(stream), None)
            deploys.append(time.perf_counter() - t0)
            for _ in stream:
                pass
            if stream.model_id != (user.id, res.model_id):
                raise SystemExit(f"deploy: answered by {stream.model_id}, not the new version {res.model_id}")
        return {"capacity": capacity, "replicas": replicas, "startup_s": startup, "memory_mib": memory,
                "decode_tps": statistics.median(speeds), "deploy_s": statistics.median(deploys),
                "deploy_max_s": max(deploys)}
    finally:
        engine.close()
        del engine
        gc.collect()
        time.sleep(1.0)  # the retired servers are torn down in their own threads


def ray_floor(tokens: int, rounds: int = 20) -> tuple[float, float]:
    """(µs per item in process, µs per item streamed from a local Ray actor): the transport floor of Ray serving."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        @ray.remote
        class Tokens:
            def stream(self, n: int):
                for i in range(n):
                    yield f"tok{i}"

        def local(n: int):
            for i in range(n):
                yield f"tok{i}"

        actor = Tokens.remote()
        ray.get(actor.__ray_ready__.remote())
        inproc, remote = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in local(tokens):
                pass
            inproc.append((time.perf_counter() - t0) / tokens * 1e6)
            t0 = time.perf_counter()
            for ref in actor.stream.options(num_returns="streaming").remote(tokens):
                ray.get(ref)
            remote.append((time.perf_counter() - t0) / tokens * 1e6)
        return statistics.median(inproc), statistics.median(remote)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="ownlm home with the base cache (default: $OWNLM_HOME)")
    ap.add_argument("--users", type=int, default=48)
    ap.add_argument("--capacities", default="48,16,4", help="adapters per replica to compare (the users: one replica)")
    ap.add_argument("--deploys", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--ray", action="store_true", help="also measure the per-token floor of streaming from a Ray actor")
    args = ap.parse_args()
    settings = load_settings(home=args.home, device="cpu", threads=args.threads)
    base = load_base(settings)
    name = base.source.name
    with tempfile.TemporaryDirectory(prefix="ownlm-replicas-") as tmp:
        root = Path(tmp)
        deltas = [make_delta(base, root, seed) for seed in range(4)]  # speed does not depend on the values
        del base
        gc.collect()
        t0 = time.perf_counter()
        s, store = node(settings, root, "node", [deltas[i % 4] for i in range(args.users)], name)
        print(f"{args.users} users installed in {time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        try:
            for cap in (int(c) for c in args.capacities.split(",")):
                row = one_capacity(s, store, cap, deltas, name, args.deploys, args.tokens)
                rows.append(row)
                print(f"  {cap:3d} adapters per replica ({row['replicas']} replicas): start-up {row['startup_s']:.1f} s, "
                      f"+{row['memory_mib']:.0f} MiB, decode {row['decode_tps']:.1f} tok/s, deploy to first token "
                      f"median {row['deploy_s']:.2f} s (max {row['deploy_max_s']:.2f} s)", flush=True)
        finally:
            store.close()
    print("\n| adapters per replica | replicas | start-up | memory | decode tokens/s | deploy to first token (median, max) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['capacity']} | {r['replicas']} | {r['startup_s']:.1f} s | +{r['memory_mib']:.0f} MiB | "
              f"{r['decode_tps']:.1f} | {r['deploy_s']:.2f} s, {r['deploy_max_s']:.2f} s |")
    if args.ray:
        inproc, remote = ray_floor(args.tokens)
        print(f"\nstreaming {args.tokens} items: in process {inproc:.1f} µs per item, from a local Ray actor "
              f"{remote:.0f} µs per item")


if __name__ == "__main__":
    main()
