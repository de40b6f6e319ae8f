"""Rounds as Ray tasks on a real local cluster: two raylets (tests/raycluster.py), each an ownlm trainer with its
own home and keys; the node is this test process (the driver), attached to the head's raylet.

Each test proves where its round ran from what the task itself returned (its Ray node id and PID), checks the
audit log and that no plaintext is left on the workers (the trainer tests' residue check, plus Ray's own
session directory: logs, spilled objects).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ownlm.errors import AttestationFailed, AuthError, CorruptArtifact, PrivacyViolation, VersionConflict
from ownlm.settings import load_settings
from ownlm.store import NewMessage, Store
from tests.raycluster import LocalCluster, processes_under

ray = pytest.importorskip("ray", reason="the cluster extra is not installed (pip install -e '.[cluster]')")

MARKER = "WOMBAT-5531-MARKER"
MEASUREMENT = "cd" * 48


@pytest.fixture(scope="module")
def cluster(tiny_base, tmp_path_factory):
    """Head (ownlm_head, no TEE) and worker b (ownlm_worker_b, the test attester), started once for this file and
    gone before the next file's tests run."""
    homes = {}
    for name in ("head", "b"):
        homes[name] = tmp_path_factory.mktemp(f"ray-{name}-home")
        (homes[name] / "settings.toml").write_text(f'base = "{tiny_base}"\ndevice = "cpu"\nthreads = 1\n')
    c = LocalCluster(homes, extra_env={"b": {"OWNLM_TRAINER_ATTESTER": f"insecure-test:{MEASUREMENT}"}})
    try:
        c.start()
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
        pytest.skip(f"Ray cannot start a local cluster here: {e}")
    try:
        from ownlm.cluster.connect import connect

        connect(node_settings(c, tiny_base))
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        c.node_id = {name: next(i for i, n in nodes.items() if f"ownlm_{'head' if name == 'head' else 'worker_b'}"
                                in n["Resources"]) for name in homes}
        yield c
    finally:
        ray.shutdown()
        c.stop()
    assert processes_under(str(c.temp)) == []


def node_settings(c, tiny_base, **cluster):
    s = load_settings(base=str(tiny_base), device="cpu")
    return s.model_copy(update={
        "personalization": s.personalization.model_copy(update={
            "max_steps": 2, "lr": 5e-3, "gate_max_kl": 10.0, "gate_behaviour": False, "qat": False, "paraphrases": 0,
            "min_samples": 10}),
        "cluster": s.cluster.model_copy(update={"ray_address": c.address, "node_ip": "127.0.0.2", **cluster})})


def make_user(store, name: str, tier: int, n: int = 16):
    user = store.create_user(name, tier=tier)
    for i in range(n):
        store.capture(user.id, [NewMessage("user", f"Question {i} about {MARKER}: mail me at {name}{i}@example.com"),
                                NewMessage("assistant", f"Answer {i}: {MARKER} is a small animal.")],
                      source="api", seed=f"{name}-{i}")
    return user


def trust_workers(store, settings, user, names=("head", "b")):
    from ownlm.cluster import placement
    from ownlm.cluster.connect import connect

    found = placement.workers(connect(settings))
    for w in found:
        store.trust(w.identity["signing_pem"], label=w.label, user_id=user.id)
    return {w.node_id: w for w in found}


def files_containing(root, needle: bytes) -> list:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                if os.path.isfile(p) and not os.path.islink(p) and needle in open(p, "rb").read():
                    hits.append(p)
            except OSError:
                pass
    return hits


def assert_no_residue(c, merkle_root: str | None = None):
    for name, home in c.homes.items():
        assert files_containing(home, MARKER.encode()) == [], name
        if merkle_root:
            assert files_containing(home, merkle_root.encode()) == [], name
        jobs = home / "trainer" / "jobs"
        assert not jobs.exists() or list(jobs.iterdir()) == [], name
    assert files_containing(c.temp, MARKER.encode()) == []  # Ray's logs and object spill: ciphertext only


def actions(store, user_id):
    return {a["action"]: a["detail"] for a in reversed(store.audit_log(user_id, limit=100))}


def claimed_round(store, settings, user, **kw):
    """cluster_round as loop.run_job calls it, with the tier-2 test verifier/policy passed through."""
    from ownlm.cluster.round import cluster_round

    job_id = store.enqueue_job(user.id, "test")
    assert store.claim_job(job_id)
    store.update_job(job_id, state="running")
    figures: dict = {}
    res = cluster_round(store, settings, user, store.job(job_id), lambda **f: store.update_job(job_id, **f), figures, **kw)
    return res, figures


def test_the_embedded_default_never_imports_ray():
    code = ("import sys, ownlm.loop, ownlm.api.app, ownlm.cli; from ownlm.settings import load_settings; "
            "from ownlm.store import Store; s = load_settings(); assert s.cluster.ray_address is None; "
            "ownlm.loop.Scheduler(Store(s.home), s); print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_tiers_0_and_1_run_where_allowed_two_rounds_at_once(home, cluster, tiny_base):
    """The scheduler with max_rounds=2: a tier-1 user's round on the head (this machine), a tier-0 user's on worker b
    (a worker is preferred to the head), both at once, both deployed; nothing left on the workers."""
    from ownlm.loop import Scheduler

    settings = node_settings(cluster, tiny_base, max_rounds=2)
    settings = settings.model_copy(update={"personalization": settings.personalization.model_copy(update={"interval": 1.0})})
    store = Store(home)
    edge, cloud = make_user(store, "edgar", 1), make_user(store, "claude", 0)
    for u in (edge, cloud):
        trust_workers(store, settings, u)
    scheduler = Scheduler(store, settings, tick=0.5).start()
    try:
        # ~20 s on a quiet 2-core machine; with the cores shared the two Ray workers take minutes to load torch
        deadline = time.time() + 400
        while time.time() < deadline and not all(store.jobs(u.id) and store.jobs(u.id)[0]["state"] not in ("queued", "running")
                                                  for u in (edge, cloud)):
            time.sleep(0.5)
    finally:
        stopped = scheduler.stop(120)
    history = {u.name: [(j["state"], j["stage"], j["reason"]) for j in store.jobs(u.id)] for u in (edge, cloud)}
    assert stopped, history
    jobs = {u.name: store.jobs(u.id)[0] for u in (edge, cloud)}
    for name, job in jobs.items():
        assert job["state"] == "deployed", (name, history)
    assert jobs["edgar"]["result"]["worker"]["node_id"] == cluster.node_id["head"]
    assert jobs["claude"]["result"]["worker"]["node_id"] == cluster.node_id["b"]
    assert jobs["edgar"]["result"]["placement"]["tier"] == 1 and jobs["claude"]["result"]["placement"]["tier"] == 0
    a, b = jobs.values()
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"], "the two rounds did not overlap"
    for u in (edge, cloud):
        log = actions(store, u.id)
        sent = log["cluster_training_sent"]
        assert sent["node_id"] == store.jobs(u.id)[0]["result"]["worker"]["node_id"] and sent["examples"] > 0
        assert log["cluster_model_judged"]["passed"] is True and "model_installed" in log
        assert MARKER not in str(store.audit_log(u.id, limit=100))
        assert len(store.models(u.id)) == 1
    assert_no_residue(cluster, jobs["claude"]["result"]["merkle_root"])
    store.close()


def test_tier2_runs_only_on_the_attested_worker(home, cluster, tiny_base):
    from ownlm.privacy.attest import AttestationPolicy, InsecureTestVerifier

    settings = node_settings(cluster, tiny_base)
    with Store(home) as store:
        user = make_user(store, "tess", 2)
        trust_workers(store, settings, user)
        res, figures = claimed_round(store, settings, user, verifier=InsecureTestVerifier(),
                                     policy=AttestationPolicy(allowed_measurements=[MEASUREMENT]))
        assert res.version == 1 and figures["worker"]["node_id"] == cluster.node_id["b"]
        sent = actions(store, user.id)["cluster_training_sent"]
        assert sent["tier"] == 2 and sent["measurement"] == MEASUREMENT and sent["verifier"] == "insecure-test"
        assert_no_residue(cluster, figures["merkle_root"])

        # a policy that allows no worker's measurement: refused before anything is sealed or submitted
        other = make_user(store, "otto", 2)
        trust_workers(store, settings, other)
        with pytest.raises(AttestationFailed, match="no Ray worker's attestation verifies") as e:
            claimed_round(store, settings, other, verifier=InsecureTestVerifier(),
                          policy=AttestationPolicy(allowed_measurements=["ee" * 48]))
        assert "(127.0.0.3): trainer measurement" in str(e.value) and "(127.0.0.2): no TEE" in str(e.value)
        assert "cluster_training_sent" not in actions(store, other.id)


def test_tier3_never_reaches_the_cluster(home, cluster, tiny_base):
    from ownlm.loop import run_job

    settings = node_settings(cluster, tiny_base)
    with Store(home) as store:
        user = make_user(store, "hana", 3)
        trust_workers(store, settings, user)
        job = run_job(store, settings, store.enqueue_job(user.id, "test"))
        assert job["state"] == "failed" and "tier 3 (homomorphic) never sends plaintext" in job["reason"]
        assert "cluster_training_sent" not in actions(store, user.id)
        assert store.query("SELECT count(*) FROM datasets WHERE user_id = ?", (user.id,))[0][0] == 0
        with pytest.raises(PrivacyViolation):
            claimed_round(store, settings, user)


def test_the_cli_lists_the_workers_and_their_keys_to_trust(home, cluster, tiny_base, tmp_path):
    from tests.conftest import run_cli

    env = {"OWNLM_BASE": str(tiny_base), "OWNLM_CLUSTER__RAY_ADDRESS": cluster.address, "OWNLM_CLUSTER__NODE_IP": "127.0.0.2"}
    r = run_cli("cluster", "workers", "--pem-dir", str(tmp_path / "pems"), env=env)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.strip()}
    assert "this machine, tier 1" in lines["127.0.0.2"] and "no TEE" in lines["127.0.0.2"]
    assert "worker" in lines["127.0.0.3"] and "attests" in lines["127.0.0.3"]
    with Store(home) as store:
        store.create_user("pia", tier=0)
    r = run_cli("trust", "add", str(tmp_path / "pems" / f"{cluster.node_id['b']}.pem"), "--user", "pia", env=env)
    assert r.returncode == 0 and r.stdout.startswith("trusted ") and r.stdout.split()[1] in lines["127.0.0.3"], r.stderr


def test_an_untrusted_worker_is_sent_nothing(home, cluster, tiny_base):
    from ownlm.loop import run_job

    settings = node_settings(cluster, tiny_base)
    with Store(home) as store:
        user = make_user(store, "una", 0)  # trusts no worker's key
        job = run_job(store, settings, store.enqueue_job(user.id, "test"))
        assert job["state"] == "failed" and "trainer key is trusted for user una" in job["reason"]
        assert "ownlm trust add" in job["reason"] and "cluster_training_sent" not in actions(store, user.id)


@pytest.mark.parametrize("retries", [1, 0])
def test_a_worker_killed_mid_round(home, cluster, tiny_base, retries):
    """SIGKILL of the worker process running the round: with a retry Ray reruns it on that worker (the only one
    that can open the sealed job) and the round deploys once; without one the round fails and says why."""
    from ownlm.loop import run_job

    settings = node_settings(cluster, tiny_base, task_retries=retries)
    settings = settings.model_copy(update={"personalization": settings.personalization.model_copy(update={"max_steps": 40})})
    with Store(home) as store:
        user = make_user(store, f"kim{retries}", 0)
        trust_workers(store, settings, user)
        job_id = store.enqueue_job(user.id, "test")
        done: dict = {}
        t = threading.Thread(target=lambda: done.update(run_job(store, settings, job_id)))
        t.start()
        jobs_dir = cluster.homes["b"] / "trainer" / "jobs"  # tier 0 prefers worker b
        sealed = cluster.homes["b"] / "trainer" / "checkpoints"
        deadline, victim = time.time() + 90, None
        while time.time() < deadline and victim is None and t.is_alive():
            running = [d for d in jobs_dir.iterdir()] if jobs_dir.exists() else []
            checkpointed = sealed.exists() and any(sealed.glob("*.sealed"))  # killed after its first checkpoint
            victim = int(running[0].name.partition("-")[0]) if running and checkpointed else None
            time.sleep(0.05)
        assert victim is not None, f"the round never checkpointed in its work directory: {store.job(job_id)}"
        os.kill(victim, signal.SIGKILL)
        t.join(400)  # ~30 s quiet; minutes when other processes share the cores
        job = store.job(job_id)
        if retries:
            assert job["state"] == "deployed", job["reason"]
            assert job["result"]["worker"]["node_id"] == cluster.node_id["b"] and job["result"]["worker"]["pid"] != victim
            assert len(store.models(user.id)) == 1
            manifest = store.models(user.id)[0]["manifest"]
            assert manifest["training"]["resumed_from_step"] >= 8  # the rerun took up the sealed checkpoint
            assert_no_residue(cluster, job["result"]["merkle_root"])  # the killed attempt's files were erased too
        else:
            assert job["state"] == "failed" and "died" in job["reason"] and "nothing was installed" in job["reason"]
            assert store.models(user.id) == []
            assert_no_residue(cluster)  # the node had the worker's agent erase what the killed process left
        assert list(sealed.glob("*.sealed")) == []  # deployed or given up: no checkpoint of the job is kept


DRIVER = """
import sys
from tests.test_cluster import node_settings
from ownlm.loop import run_job
from ownlm.store import Store

class Cluster:
    address = sys.argv[1]

s = node_settings(Cluster, sys.argv[2])
s = s.model_copy(update={"personalization": s.personalization.model_copy(update={"max_steps": 60})})
run_job(Store(s.home), s, sys.argv[3])
"""


def test_a_node_killed_mid_round_is_reconciled(home, cluster, tiny_base):
    """The node's process dies while its round trains on worker b: Ray ends the orphaned task with its driver, the
    restarted node's scheduler re-queues the job, and the round runs again from the start and deploys once."""
    from ownlm.loop import Scheduler, run_job
    from tests.conftest import REPO

    settings = node_settings(cluster, tiny_base)
    with Store(home) as store:
        user = make_user(store, "nora", 0)
        trust_workers(store, settings, user)
        job_id = store.enqueue_job(user.id, "test")
        node = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address, str(tiny_base), job_id], cwd=REPO,
                                env={**os.environ, "OWNLM_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        jobs_dir, deadline, trainer_pid = cluster.homes["b"] / "trainer" / "jobs", time.time() + 90, None
        while time.time() < deadline and trainer_pid is None and node.poll() is None:
            running = list(jobs_dir.iterdir()) if jobs_dir.exists() else []
            trainer_pid = int(running[0].name.partition("-")[0]) if running else None
            time.sleep(0.05)
        assert trainer_pid is not None, node.stderr.read().decode()[-2000:] if node.poll() is not None else "no round"
        node.kill()
        node.wait(30)
        assert store.job(job_id)["state"] == "running"  # as the dead node left it
        deadline = time.time() + 60
        while time.time() < deadline and os.path.exists(f"/proc/{trainer_pid}"):
            time.sleep(0.2)  # Ray kills the orphaned task's worker process (its owner, the driver, is gone)
        assert not os.path.exists(f"/proc/{trainer_pid}"), "the orphaned round kept training"
        scheduler = Scheduler(store, settings.model_copy(update={"personalization": settings.personalization.model_copy(
            update={"enabled": False})}), tick=60)
        scheduler._thread = type("T", (), {"start": lambda self: None})()  # only the restart bookkeeping
        scheduler.start()
        assert store.job(job_id)["state"] == "queued"
        job = run_job(store, settings, job_id)
        assert job["state"] == "deployed", job["reason"]
        assert len(store.models(user.id)) == 1
        assert_no_residue(cluster, job["result"]["merkle_root"])


def test_a_bundle_for_another_user_or_round_is_refused(home, cluster, tiny_base):
    import json

    from ownlm.artifact.seal import seal
    from ownlm.basemodel import base_sha256, load_tokenizer, resolve_base
    from ownlm.cluster import placement
    from ownlm.cluster.connect import connect
    from ownlm.cluster.round import accept_bundle, run_on
    from ownlm.learn.dataset import DatasetConfig, build
    from ownlm.privacy.remote import job_document

    settings = node_settings(cluster, tiny_base)
    with Store(home) as store:
        ann, ben = make_user(store, "ann", 0), make_user(store, "ben", 0)
        workers = trust_workers(store, settings, ann)
        trust_workers(store, settings, ben)
        conversations, feedback = store.training_view(ann.id)
        built = build(conversations, feedback, load_tokenizer(settings), DatasetConfig(min_examples=2, redact=True))
        worker = workers[cluster.node_id["b"]]
        doc = job_document(ann, built, store.node_key().public_json(), base_sha256(resolve_base(settings.base), settings.home),
                           settings, 1, None)
        out = run_on(connect(settings), settings, worker, seal({"job.json": json.dumps(doc).encode()}, worker.identity["hpke"]), "t")
        assert out["node_id"] == worker.node_id
        bundle = out["bundle"]
        with pytest.raises(AuthError, match="this bundle is for user ann"):
            accept_bundle(store, settings, ben, built, bundle, version=1, source=worker.label)
        with pytest.raises(CorruptArtifact, match="for another round of ann"):
            accept_bundle(store, settings, ann, built, bundle, version=2, source=worker.label)
        assert store.models(ann.id) == [] and store.models(ben.id) == []
        res = accept_bundle(store, settings, ann, built, bundle, version=1, source=worker.label)
        assert res.version == 1
        with pytest.raises(VersionConflict):  # delivered twice: installed once
            accept_bundle(store, settings, ann, built, bundle, version=1, source=worker.label)
        assert len(store.models(ann.id)) == 1
        assert placement._in_flight.get(worker.node_id) == 0


def test_a_worker_machine_lost_mid_round_is_placed_again(home, cluster, tiny_base):
    """Worker b's whole Ray node (its raylet and every process under it) SIGKILLed while it trains a round: the job
    sealed to b can be opened nowhere else, so the node seals it again to the head and the round deploys there,
    once. When b comes back, its trainer erases what the killed round left. (Last in this file: it kills b.)"""
    from ownlm.cluster import placement
    from ownlm.cluster.connect import connect
    from ownlm.loop import run_job
    from tests.raycluster import WORKER_IP, _children

    settings = node_settings(cluster, tiny_base)
    settings = settings.model_copy(update={"personalization": settings.personalization.model_copy(update={"max_steps": 60})})
    with Store(home) as store:
        user = make_user(store, "lena", 0)
        trust_workers(store, settings, user)
        job_id = store.enqueue_job(user.id, "test")
        done: dict = {}
        t = threading.Thread(target=lambda: done.update(run_job(store, settings, job_id)))
        t.start()
        jobs_dir, deadline, trainer_pid = cluster.homes["b"] / "trainer" / "jobs", time.time() + 90, None
        while time.time() < deadline and trainer_pid is None and t.is_alive():
            running = list(jobs_dir.iterdir()) if jobs_dir.exists() else []
            trainer_pid = int(running[0].name.partition("-")[0]) if running else None
            time.sleep(0.05)
        assert trainer_pid is not None, store.job(job_id)
        raylet = int(open(f"/proc/{trainer_pid}/stat").read().rsplit(")", 1)[1].split()[1])  # the worker's parent
        assert "raylet" in open(f"/proc/{raylet}/cmdline").read()
        kids, machine, todo = _children(), [], [raylet]
        while todo:
            pid = todo.pop()
            machine.append(pid)
            todo.extend(kids.get(pid, []))
        for pid in machine:
            os.kill(pid, signal.SIGKILL)
        t.join(240)
        job = store.job(job_id)
        assert job["state"] == "deployed", job["reason"]
        assert job["result"]["worker"]["node_id"] == cluster.node_id["head"]
        assert [n["node_id"] for n in job["result"]["nodes_lost"]] == [cluster.node_id["b"]]
        sent = [a["detail"]["node_id"] for a in store.audit_log(user.id, limit=100) if a["action"] == "cluster_training_sent"]
        assert sorted(sent) == sorted([cluster.node_id["b"], cluster.node_id["head"]])
        assert len(store.models(user.id)) == 1
        assert list(jobs_dir.iterdir()) != []  # the dead machine's disk still holds the killed round's work dir...

    cluster._start("b", ["--address", cluster.address, "--node-ip-address", WORKER_IP,
                         "--resources", '{"ownlm_worker_b": 1}'])
    found = placement.workers(connect(settings))  # starts the new node's agent, which erases it first
    assert any(w.address == WORKER_IP for w in found)
    assert list(jobs_dir.iterdir()) == []  # ...until its trainer starts again
    assert files_containing(cluster.homes["b"], MARKER.encode()) == []
