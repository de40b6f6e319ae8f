"""Cluster capacity: N users' rounds on a local Ray cluster of one raylet vs two, and what 1,000 / 100,000 users need.

For each cluster size it starts real raylets on loopback addresses (tests/raycluster.py: `ray start --head` plus
workers, 1 CPU each, each an ownlm trainer with its own home), makes N tier-0 users with the first
`--conversations` conversations of a persona, enqueues one round per user and lets the node's scheduler
(`cluster.max_rounds` = N) run them all as Ray tasks, exactly as `ownlm serve` would with `[cluster]` set.

Per run it prints wall time, rounds per hour, per-round latency (enqueued → installed: queueing included) and
the CPU seconds per round, measured on the worker (the trainer task's process CPU time) and on the node (this
process: dataset, sealing, the quality gate on the returned bundle, install). The projection divides the
measured CPU seconds of one round by an hour at `--utilisation` to give the cores needed for U users at one
round per user per hour; its assumptions are printed with it.

    OWNLM_HOME=… .venv/bin/python bench/cluster.py [--users 4] [--steps 8] [--raylets 1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
from ownlm.capture.importers import parse_file  # noqa: E402
from ownlm.evaluate.personas.fixtures import DATA_DIR  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402
from ownlm.store.imports import import_into  # noqa: E402
from tests.raycluster import LocalCluster  # noqa: E402


def worker_homes(tmp: Path, base: str, cache: Path, n: int) -> dict[str, Path]:
    homes = {}
    for name in ["head", "b"][:n]:
        h = tmp / f"worker-{name}"
        (h / "cache").mkdir(parents=True)
        (h / "cache" / "base").symlink_to(cache / "base")  # the converted base, shared: no GGUF conversion per worker
        (h / "settings.toml").write_text(f'base = "{base}"\ndevice = "cpu"\nthreads = 1\n')
        homes[name] = h
    return homes


def run(args, settings, raylets: int, tmp: Path) -> dict:
    import ray

    from ownlm.cluster import placement
    from ownlm.cluster.connect import connect
    from ownlm.loop import Scheduler

    homes = worker_homes(tmp / f"r{raylets}", settings.base, settings.home / "cache", raylets)
    c = LocalCluster(homes).start(second=raylets == 2)
    node_home = tmp / f"node-r{raylets}"
    (node_home / "cache").mkdir(parents=True)
    (node_home / "cache" / "base").symlink_to(settings.home / "cache" / "base")
    s = load_settings(home=str(node_home), base=settings.base, device="cpu", threads=1)
    s = s.model_copy(update={
        "personalization": s.personalization.model_copy(update={"max_steps": args.steps, "interval": 3600, "enabled": False}),
        "cluster": s.cluster.model_copy(update={"ray_address": c.address, "node_ip": "127.0.0.2", "max_rounds": args.users})})
    store = Store(node_home)
    try:
        found = placement.workers(connect(s))
        lines = (DATA_DIR / f"{args.persona}.jsonl").read_text().splitlines()[: args.conversations]
        data = tmp / "persona.jsonl"
        data.write_text("\n".join(lines))
        users = []
        for i in range(args.users):
            u = store.create_user(f"user{i}", tier=0)
            import_into(store, u.id, parse_file(data), args.persona)
            for w in found:
                store.trust(w.identity["signing_pem"], label=w.label, user_id=u.id)
            users.append(u)
        cpu0, t0 = time.process_time(), time.time()
        for u in users:
            store.enqueue_job(u.id, "bench")
        sched = Scheduler(store, s, tick=0.2).start()
        while any(j["state"] in ("queued", "running") for u in users for j in store.jobs(u.id)):
            time.sleep(0.5)
        sched.stop(60)
        wall, node_cpu = time.time() - t0, time.process_time() - cpu0
        jobs = [store.jobs(u.id)[0] for u in users]
    finally:
        store.close()
        ray.shutdown()
        c.stop()
    bad = [j["reason"] for j in jobs if j["state"] not in ("deployed", "refused")]  # a refused round ran all the same
    if bad:
        raise SystemExit(f"rounds failed: {bad}")
    lat = [j["finished_at"] - j["created_at"] for j in jobs]
    worker_cpu = [j["result"]["worker"]["cpu_s"] for j in jobs]
    return {"raylets": raylets, "users": args.users, "wall_s": round(wall, 1), "rounds_per_hour": round(3600 * len(jobs) / wall, 1),
            "latency_p50_s": round(statistics.median(lat), 1), "latency_max_s": round(max(lat), 1),
            "worker_cpu_s_per_round": round(statistics.mean(worker_cpu), 1), "node_cpu_s_per_round": round(node_cpu / len(jobs), 1),
            "train_s_per_round": round(statistics.mean(j["result"]["training"]["duration_s"] for j in jobs), 1),
            "nodes_used": len({j["result"]["worker"]["node_id"] for j in jobs}),
            "deployed": sum(j["state"] == "deployed" for j in jobs)}


def projection(row: dict, users: int, utilisation: float) -> str:
    worker_cores = users * row["worker_cpu_s_per_round"] / 3600 / utilisation
    node_cores = users * row["node_cpu_s_per_round"] / 3600 / utilisation
    return (f"{users:,} users: {worker_cores:,.1f} worker cores + {node_cores:,.1f} node cores "
            f"(= {worker_cores / 16:,.1f} + {node_cores / 16:,.1f} machines of 16 cores)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per round (the node's default is 48)")
    ap.add_argument("--persona", default="bram")
    ap.add_argument("--conversations", type=int, default=40)
    ap.add_argument("--raylets", default="1,2")
    ap.add_argument("--utilisation", type=float, default=0.7, help="share of each core the projection plans to use")
    args = ap.parse_args()
    settings = load_settings()
    from ownlm.basemodel import checkpoint_dir, resolve_base

    checkpoint_dir(resolve_base(settings.base), settings.home)  # the converted base, once, before any timing
    rows = []
    with tempfile.TemporaryDirectory(prefix="ownlm-bench-cluster-") as tmp:
        for n in [int(x) for x in args.raylets.split(",")]:
            rows.append(run(args, settings, n, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.users} users, {args.steps} steps, base {settings.base}, 1 CPU per raylet and per round")
    print("| raylets | wall s | rounds/hour | latency p50 / max s | worker CPU s/round | node CPU s/round | train s/round |")
    for r in rows:
        print(f"| {r['raylets']} ({r['nodes_used']} used, {r['deployed']}/{r['users']} deployed) | {r['wall_s']} | {r['rounds_per_hour']} | {r['latency_p50_s']} / {r['latency_max_s']} | "
              f"{r['worker_cpu_s_per_round']} | {r['node_cpu_s_per_round']} | {r['train_s_per_round']} |")
    best = rows[-1]
    print(f"\nprojection at one round per user per hour, {args.steps}-step rounds as measured, cores used at "
          f"{args.utilisation:.0%}, rounds spread evenly over the hour:")
    for u in (1_000, 100_000):
        print("  " + projection(best, u, args.utilisation))


if __name__ == "__main__":
    main()
