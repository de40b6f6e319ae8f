"""The node side of a round on the Ray cluster (loop.py runs this instead of the local round when
`cluster.ray_address` is set). It is privacy/remote.py's round with Ray as the transport:

1. the tier is read first: tier 3 ends here, before even the dataset is built;
2. the dataset is built with redaction on (as for any trainer that is not this process);
3. placement (cluster/placement.py) picks the worker the tier allows and whose key the user trusts — for tier 2
   only after that worker's attestation verifies;
4. the job (privacy/remote.job_document) is sealed with HPKE to that worker's trainer key, and the transfer is
   audited (destination, Merkle root, example count; never content). Ray's object store and wire carry only
   that ciphertext, so tier 0's "over TLS" holds end to end without Ray's own TLS;
5. one Ray task, pinned to that worker (hard node affinity), asking `cluster.cpus_per_round`/`gpus_per_round`,
   rerun by Ray up to `cluster.task_retries` times if its worker process dies;
6. the bundle that comes back must be from that node, for this user (open_verified) and for *this* round
   (its version and dataset Merkle root), is judged by the node's own quality gate and installed
   exactly as a remote trainer's bundle is. The store's install refuses a version it already has, so a bundle
   delivered twice is installed once.
Faults: a worker *process* killed mid-round is rerun by Ray on the same node (`cluster.task_retries`; only that
node's trainer can open the job), which resumes from the job's last sealed checkpoint (privacy/checkpoints.py);
then the round fails with the reason and the worker erases that checkpoint. A whole *node* lost mid-round (raylet
gone) makes the job unopenable anywhere else, so it is placed again among the other eligible workers and sealed
anew (audited as a new transfer). A node process (this one) that dies mid-round takes its Ray tasks with it
(Ray ends a dead driver's tasks); the restarted scheduler re-queues the job (loop.Scheduler.start).
One open round per user and the job's states are the loop's (store/jobs.py); how many rounds run at once is the
scheduler's (`cluster.max_rounds`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

from ownlm.cluster import placement
from ownlm.cluster.connect import connect
from ownlm.errors import CorruptArtifact, OwnlmError, RemoteTrainerError
from ownlm.privacy import checkpoints
from ownlm.privacy import tiers as privacy
from ownlm.privacy.remote import install_judged, job_document, redacted_dataset
from ownlm.settings import Settings
from ownlm.store import Store, User

# The node's own work for concurrent rounds — building a dataset, judging a bundle — runs one round at a time:
# transformers is not thread-safe there (two first imports at once: "cannot import name 'AutoTokenizer'"; two base
# loads at once: "Cannot copy out of meta tensor"), and it runs on the node's cores, which serve chat meanwhile.
# The training, the long part, runs on the workers in parallel.
_node_work = threading.Lock()
NODE_DEATH_S = 45.0  # how long a failed round waits for the GCS to say whether its node died (Ray: ~5 x 3 s checks)


def cluster_round(store: Store, settings: Settings, user: User, job: dict, update, figures: dict, *,
                  verifier=None, policy=None):
    """Run `job` (already claimed, state 'running') on the cluster; returns node.InstallResult.

    `update(**fields)` writes the job row under the caller's lease; `figures` collects the job's result.
    Raises PrivacyViolation/AttestationFailed/ConfigError before anything is sent, RemoteTrainerError when the
    task fails, QualityGateRefused when the node's gate refuses the bundle, or any install error.
    """
    from ownlm.artifact.seal import seal
    from ownlm.basemodel import base_sha256, resolve_base
    from ownlm.learn.dataset import config_dict

    if store.get_user(user.id).privacy_tier == 3:  # before the dataset exists: nothing of it is even built
        privacy.check_may_send(3, "the Ray cluster")
    ray = connect(settings)
    watermark = job["watermark"] or store.message_watermark(user.id)
    with _node_work:
        built = redacted_dataset(store, settings, user)
    ds_id = store.save_dataset(user.id, built, config_dict(built.config))
    figures.update(dataset=ds_id, merkle_root=built.merkle_root, examples=len(built.examples))
    update(watermark=watermark, stage="train", progress=0.0)

    latest = store.models(user.id)
    version = store.max_version(user.id) + 1
    doc = job_document(user, built, store.node_key().public_json(), base_sha256(resolve_base(settings.base), settings.home),
                       settings, version, latest[0]["id"] if latest else None)
    job_json = json.dumps(doc, ensure_ascii=False).encode()
    trained_job = checkpoints.job_id(doc)  # names the worker's sealed checkpoint of this job, to erase it if it fails
    del doc
    lost: list[str] = []  # nodes that died under this round: it is placed again among the others, sealed anew
    while True:
        worker, detail = placement.place(ray, store, settings, user, verifier=verifier, policy=policy, exclude=lost)
        sealed = seal({"job.json": job_json}, worker.identity["hpke"])
        with store.tx() as db:  # recorded before submitting: if anything left this process, the log says so
            store.audit(db, user.id, "cluster_training_sent", job=job["id"], merkle_root=built.merkle_root,
                        examples=len(built.examples), bytes=len(sealed), **detail)
        figures.update(placement=detail)
        update(result=figures)
        try:
            out = run_on(ray, settings, worker, sealed, job["id"], trained_job)
            break
        except NodeLost as e:
            lost.append(worker.node_id)
            figures.setdefault("nodes_lost", []).append({"node_id": worker.node_id, "reason": e.message})
            with store.tx() as db:
                store.audit(db, user.id, "cluster_node_lost", job=job["id"], destination=worker.label)
    del job_json
    bundle = out["bundle"]
    figures.update(worker={"node_id": out["node_id"], "pid": out["pid"], "seconds": out["seconds"], "cpu_s": out["cpu_s"]})
    with store.tx() as db:
        store.audit(db, user.id, "cluster_bundle_received", job=job["id"], destination=worker.label, bytes=len(bundle),
                    sha256=hashlib.sha256(bundle).hexdigest(), pid=out["pid"])
    if out["node_id"] != worker.node_id:
        raise RemoteTrainerError(f"the round's bundle came from Ray node {out['node_id'][:12]}, not from "
                                 f"{worker.label} where it was placed; nothing was installed",
                                 hint="the cluster ignored the round's node affinity: check the Ray version")
    update(stage="gate", progress=0.0, result=figures)
    res = accept_bundle(store, settings, user, built, bundle, version=version, source=worker.label, figures=figures)
    figures.update(model_id=res.model_id, version=res.version, bundle_bytes=len(bundle))
    return res


def run_on(ray, settings: Settings, worker, sealed: bytes, job_id: str, trained_job: str = "") -> dict:
    """Submit the round task to `worker` and wait for it: {"bundle", "node_id", "pid", "seconds"}.
    Every way it can fail becomes a RemoteTrainerError that says what happened. `trained_job`
    (privacy.checkpoints.job_id of the job) is the sealed checkpoint the worker erases when the round has failed."""
    from ray.exceptions import GetTimeoutError, NodeDiedError, RayTaskError, TaskUnschedulableError, WorkerCrashedError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ownlm.cluster.agent import run_round

    cfg = settings.cluster
    t0 = time.monotonic()
    with placement.slot(worker.node_id):
        ref = run_round.options(
            name=f"ownlm-round-{job_id}", num_cpus=cfg.cpus_per_round, num_gpus=cfg.gpus_per_round,
            # hard affinity: the job is sealed to this worker's key; on any other node it could not be opened
            scheduling_strategy=NodeAffinitySchedulingStrategy(worker.node_id, soft=False),
            max_retries=cfg.task_retries, retry_exceptions=False,  # a refused job is not retried, a dead worker is
        ).remote(sealed, worker.node_id)
        try:
            out = ray.get(ref, timeout=cfg.timeout_s)
        except GetTimeoutError:
            ray.cancel(ref, force=True)
            raise RemoteTrainerError(f"the round on {worker.label} did not finish in {cfg.timeout_s:g} s; it was "
                                     "cancelled and nothing was installed", hint="raise cluster.timeout_s") from None
        except RayTaskError as e:
            cause = e.cause if isinstance(e.cause, OwnlmError) else None
            why = cause.message if cause is not None else f"{type(e.cause).__name__}: {e.cause}"
            raise RemoteTrainerError(f"the trainer on {worker.label} refused or failed the job: {why}",
                                     hint=(cause.hint if cause is not None and cause.hint else "see the worker's log")) from None
        except (WorkerCrashedError, TaskUnschedulableError, NodeDiedError) as e:
            if not _alive(ray, worker):
                raise NodeLost(f"{worker.label} left the cluster during the round ({type(e).__name__})",
                               hint="the round is placed on another worker") from None
            _sweep(ray, worker, trained_job)
            raise RemoteTrainerError(
                f"the worker process running the round on {worker.label} died (tried {cfg.task_retries + 1} "
                f"time{'s' if cfg.task_retries else ''}; {type(e).__name__}); nothing was installed",
                hint="the next round is placed afresh; raise cluster.task_retries to rerun it on the same worker") from None
        except ray.exceptions.RayError as e:  # object lost, actor died...: the round failed, say how
            if not _alive(ray, worker):
                raise NodeLost(f"{worker.label} left the cluster during the round ({type(e).__name__})",
                               hint="the round is placed on another worker") from None
            raise RemoteTrainerError(f"the round on {worker.label} failed in the cluster ({type(e).__name__}); "
                                     "nothing was installed", hint="see `ray status`; the next round is placed afresh") from None
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


class NodeLost(RemoteTrainerError):
    """The Ray node a round was placed on is gone: the job sealed to it can be opened nowhere else, so the round is
    sealed again to another eligible worker (cluster_round)."""


def _alive(ray, worker, wait_s: float = NODE_DEATH_S) -> bool:
    """Whether `worker`'s node is still in the cluster after its round failed. Its agent answering says yes at
    once (a killed worker process leaves the raylet and the agent running); otherwise wait up to `wait_s` for
    the GCS's verdict, which comes only after missed health checks."""
    try:
        ray.get(worker.agent.identity.remote(), timeout=10)
        return True
    except ray.exceptions.RayError:
        pass
    deadline = time.monotonic() + wait_s
    while True:
        alive = any(n["NodeID"] == worker.node_id and n.get("Alive") for n in ray.nodes())
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.5)


def _sweep(ray, worker, trained_job: str = "") -> None:
    """A killed trainer process never ran its `finally`: have the worker's agent erase its work directory (and the
    failed job's sealed checkpoint, which no retry will resume) now rather than at that node's next round. Best
    effort: the node may be gone with the worker."""
    try:
        ray.get(worker.agent.sweep.remote([trained_job] if trained_job else []), timeout=30)
    except ray.exceptions.RayError:
        pass


def accept_bundle(store: Store, settings: Settings, user: User, built, bundle: bytes, *, version: int, source: str,
                  figures: dict | None = None):
    """Verify, judge and install a bundle that a cluster round for `user`, `version` and `built` produced.

    Refuses a bundle for another user (AuthError), for another round of this user — another version or another
    dataset — (CorruptArtifact), one the gate refuses (QualityGateRefused), and one already installed
    (VersionConflict: never installed twice)."""
    from ownlm.node.install import open_verified

    verified = open_verified(store, settings, bundle, expect_user_id=user.id)
    root = (verified.manifest.get("dataset") or {}).get("merkle_root")
    if verified.version != version or root != built.merkle_root:
        raise CorruptArtifact(f"the bundle from {source} is for another round of {user.name} (version {verified.version}, "
                              f"dataset {str(root)[:12]}…), not this one (version {version}, dataset "
                              f"{built.merkle_root[:12]}…); nothing was installed", hint="run the round again")
    if figures is not None:
        training = verified.manifest.get("training") or {}
        figures.update(training={k: training.get(k) for k in ("samples", "tokens", "duration_s")})
    return install_judged(store, settings, user, built, verified, source=source, audit_action="cluster_model_judged",
                          figures=figures, lock=_node_work)
