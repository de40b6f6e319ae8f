"""The continuous learning loop: dataset → train → compress → quality gate → sign → seal → deploy.

One round is a persisted job (store table `jobs`): its stage and progress are visible in
/api/personalization/status while it runs, and a node restarted mid-round re-queues it (training resumes
from its checkpoint in home/jobs/<job id>/). The scheduler checks each user every `interval` seconds and
starts a round when at least `min_samples` new assistant replies were captured since the last deployed
model. Rounds run one at a time in a worker thread; serving goes on meanwhile. With `cluster.ray_address` set,
each round runs as a Ray task on a worker its user's privacy tier allows (ownlm/cluster/), up to
`cluster.max_rounds` at once, one per user.

The quality gate deploys a model only if, on the user's held-out conversations, the *compressed* personal
model has a lower assistant-token NLL than the base, its drift from the base on generic prompts stays under
`gate_max_kl`, and the 1-bit delta keeps at least `gate_min_fidelity` of the LoRA's NLL gain. Otherwise the
previous model keeps serving and the job records exactly why.

Continual learning (learn/continual.py): by default a round continues the serving model's fp32 adapter on the new
examples plus a replayed sample of older ones, instead of retraining on the whole history; the job's result
says which strategy ran and why (a round retrains from scratch after a delete, a rollback or a base change).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

from ownlm.learn.continual import Lineage, RoundPlan, adapter_dir, forget, keep_adapter, plan_round, read_lineage
from ownlm.errors import OwnlmError, QualityGateRefused
from ownlm.settings import Settings
from ownlm.store import Store
from ownlm.store.jobs import LEASE_S, PROCESS_OWNER, LeaseLost, owner_alive

log = logging.getLogger(__name__)
STAGES = ("dataset", "train", "compress", "gate", "bundle", "deploy")


class GateRefused(Exception):
    def __init__(self, reason: str, figures: dict):
        super().__init__(reason)
        self.reason, self.figures = reason, figures


class _Lease:
    """Keeps this process's lease on a job alive from a background thread while the round runs."""

    def __init__(self, store: Store, job_id: str, owner: str, lease_s: float = LEASE_S):
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"ownlm-lease-{job_id}")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.store.renew_job(self.job_id, self.owner, self.lease_s)
            except LeaseLost:
                return  # the round's next write raises LeaseLost too and ends it
            except Exception:  # a busy store: try again at the next beat, the lease has room for three
                log.warning("lease renewal of %s failed: %s", self.job_id, traceback.format_exc())

    def __enter__(self) -> "_Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def run_job(store: Store, settings: Settings, job_id: str, on_deployed: Callable[[str], None] | None = None,
            owner: str = PROCESS_OWNER) -> dict:
    """Run one round to its end; the job row says how it ended ('deployed', 'refused' or 'failed').

    Only the process holding the job's lease runs it (store/jobs.py): if another one holds it, nothing is done
    and the job is returned as it stands.
    """
    if not store.claim_job(job_id, owner):
        return store.job(job_id)
    with _Lease(store, job_id, owner):
        try:
            return _run_claimed(store, settings, job_id, on_deployed, owner)
        except LeaseLost:
            log.warning("job %s was taken over by another process; this one stops", job_id)
            return store.job(job_id)


def _run_claimed(store: Store, settings: Settings, job_id: str, on_deployed, owner: str) -> dict:
    job = store.job(job_id)
    user = store.get_user(job["user_id"])
    work = settings.home / "jobs" / job_id

    def update(**fields) -> None:  # every write of this round, only while we hold its lease
        store.update_job(job_id, as_owner=owner, **fields)

    update(state="running", started_at=time.time(), stage="dataset", progress=0.0)
    figures: dict = {}
    try:
        if settings.cluster.ray_address:  # imported only here: without a cluster, ray is never imported
            from ownlm.cluster.round import cluster_round

            res = cluster_round(store, settings, user, job, update, figures)
        else:
            res = _local_round(store, settings, user, job, work, update, figures)
        update(state="deployed", stage=None, progress=1.0, finished_at=time.time(), result=figures,
               reason=f"deployed {res.model_id}")
        with store.tx() as db:
            store.audit(db, user.id, "trained", job=job_id, dataset=figures.get("dataset"), model=res.model_id,
                        merkle_root=figures.get("merkle_root"))
        if on_deployed:
            on_deployed(user.id)
    except LeaseLost:
        raise  # another process owns the round now: write nothing, leave its work directory alone
    except GateRefused as e:
        update(state="refused", finished_at=time.time(), result=e.figures or figures, reason=e.reason)
    except QualityGateRefused as e:  # the node's gate on a bundle trained on the cluster
        update(state="refused", finished_at=time.time(), result=figures, reason=e.message)
    except OwnlmError as e:
        update(state="failed", finished_at=time.time(), result=figures, reason=str(e))
    except Exception as e:  # a bug: record it, keep the node serving
        log.error("job %s failed: %s", job_id, traceback.format_exc())
        update(state="failed", finished_at=time.time(), result=figures, reason=f"internal error: {e!r}")
    finally:
        job = store.job(job_id)
        if job["state"] != "running" and job["owner"] == owner:
            shutil.rmtree(work, ignore_errors=True)
    return store.job(job_id)


def _local_round(store: Store, settings: Settings, user, job: dict, work, update, figures: dict):
    """The round in this process: dataset → train → compress → gate → bundle → install. Returns InstallResult."""
    from ownlm.basemodel import load_base
    from ownlm.learn.dataset import DatasetConfig, build, config_dict, tokenize
    from ownlm.learn.train import TrainConfig, train

    job_id, cfg = job["id"], settings.personalization
    # 1. dataset (deterministic, so a resumed job rebuilds the same one and its training checkpoint fits)
    watermark = job["watermark"] or store.message_watermark(user.id)
    audit_mark = store.audit_mark()  # a delete after this point makes this round's adapter unfit to continue
    conversations, feedback = store.training_view(user.id)
    base = load_base(settings)
    dcfg = DatasetConfig(min_examples=min(cfg.min_samples, 10), paraphrases=cfg.paraphrases)
    built = build(conversations, feedback, base.tokenizer, dcfg)
    ds_id = store.save_dataset(user.id, built, config_dict(dcfg))
    update(watermark=watermark, stage="train", progress=0.0)
    train_ex, held_ex = tokenize(built.split("train"), base.tokenizer), tokenize(built.split("heldout"), base.tokenizer)
    if not held_ex:
        raise GateRefused("no held-out conversations to judge a new model on (need at least 2 conversations)", {})
    figures.update(dataset=ds_id, merkle_root=built.merkle_root, train_examples=len(train_ex), heldout_examples=len(held_ex))

    # 2. train: from the serving model's adapter on the new data, or afresh (learn/continual.py says when)
    epsilon = round_epsilon(store, settings, user.id)  # differential privacy, when the user or node asks for it
    tcfg = TrainConfig(lr=cfg.lr, epochs=cfg.epochs, max_steps=cfg.max_steps, time_budget_s=cfg.time_budget_s,
                       qat=cfg.qat, anchor_kl=cfg.anchor_kl, dp=epsilon is not None, dp_epsilon=epsilon,
                       dp_max_grad_norm=cfg.dp_max_grad_norm)
    serving = store.active_model(user.id)  # what this round continues (or not) and would replace
    plan = _plan(store, settings, user.id, train_ex, tcfg, base.sha256, job_id, base=base, heldout=held_ex)
    figures.update(continual=plan.summary())

    def on_progress(p) -> None:
        if p.phase == "train" and p.total_steps:
            live = {**figures, "live": {"step": p.step, "total_steps": p.total_steps, "loss": p.loss,
                                        "tokens_per_s": p.tokens_per_s, "eta_s": p.eta_s}}
            update(progress=round(p.step / p.total_steps, 3), result=live)

    report = train(base, plan.examples, held_ex, tcfg, work / "train", progress=on_progress,
                   dataset={"id": ds_id, "merkle_root": built.merkle_root}, init_adapter=plan.init_adapter)
    figures.update(train_loss=report.loss, heldout_loss_base=report.heldout_loss_base,
                   heldout_loss_lora=report.heldout_loss_personal, train_seconds=report.duration_s,
                   tokens_per_s=report.tokens_per_s, steps=report.steps, loss_curve=report.loss_curve, dp=report.dp)
    update(stage="compress", progress=0.0)

    # 3. compress, 4. gate
    from ownlm.evaluate.gate import behaviour_prompts, compress_adapter, judge

    delta = compress_adapter(work / "train" / "adapter", work / "delta", base)
    update(stage="gate", progress=0.0)
    verdict = judge(base, delta, held_ex, report, cfg,
                    behaviour=behaviour_prompts(built.split("train"), built.split("heldout")),
                    repetition_penalty=settings.repetition_penalty)
    figures.update(verdict)
    if not verdict["passed"]:
        if verdict["resumable"] and cfg.continue_refused:
            keep_adapter(settings.home, user.id, work / "train" / "adapter", Lineage(
                model_id=serving["id"] if serving else "", dataset_id=ds_id, base_sha256=base.sha256, lora=_lora(tcfg),
                audit_mark=audit_mark, refused_job=job_id))
            figures["kept_for_next_round"] = True
        raise GateRefused(verdict["reason"], figures)

    # 5. bundle (signed with the user's key, sealed to this node), 6. deploy
    update(stage="bundle", progress=0.0)
    from ownlm.artifact.bundle import make_bundle
    from ownlm.node.install import install

    latest = store.models(user.id)
    report_dict = json.loads(report.to_json())
    report_dict["samples"] = report.samples
    report_dict["heldout_loss_personal"] = verdict["heldout_loss_compressed"]
    data, manifest = make_bundle(
        delta_dir=work / "delta", report=report_dict, user_name=user.name, signing_key=store.signing_key(user.id),
        recipient=store.node_key().public_json(), base_name=base.source.name,
        version=store.max_version(user.id) + 1, previous=latest[0]["id"] if latest else None,
    )
    update(stage="deploy", progress=0.0)
    res = install(store, settings, data, keep=cfg.keep_versions)
    figures.update(model_id=res.model_id, version=res.version, bundle_bytes=len(data),
                   artifact_bytes=sum(f["size"] for f in manifest["files"].values()) + len(json.dumps(manifest)))
    keep_adapter(settings.home, user.id, work / "train" / "adapter", Lineage(
        model_id=res.model_id, dataset_id=ds_id, base_sha256=base.sha256, lora=_lora(tcfg), audit_mark=audit_mark))
    return res


def round_epsilon(store: Store, settings: Settings, user_id: str) -> float | None:
    """The epsilon a local round of this user spends (None: no DP): the user's own choice, else the node's."""
    own = store.dp_epsilon(user_id)
    epsilon = own if own is not None else settings.personalization.dp_epsilon
    return epsilon if epsilon else None


def _lora(tcfg) -> dict:
    return {"r": tcfg.r, "alpha": tcfg.alpha, "target_modules": sorted(tcfg.target_modules)}


def _plan(store: Store, settings: Settings, user_id: str, train_ex: list, tcfg, base_sha256: str, job_id: str, *,
          base=None, heldout: list | None = None) -> RoundPlan:
    """The round's examples and starting adapter under settings.personalization.continual. A new user's first
    round may start from the community model (privacy/community.py): only if they opted in and, unless
    personalization.community_min_gain is None, it lowers their held-out NLL (`base`, `heldout`) by that much."""
    lineage = read_lineage(settings.home, user_id)
    deleted = lineage is not None and store.deleted_since(user_id, lineage.audit_mark)
    if deleted:
        forget(settings.home, user_id)
    active = store.active_model(user_id)
    cfg = settings.personalization
    plan = plan_round(
        cfg.continual, train_ex, lineage=lineage, adapter=adapter_dir(settings.home, user_id),
        old_hashes=store.dataset_hashes(user_id, lineage.dataset_id) if lineage else set(),
        active_model_id=active["id"] if active else None, base_sha256=base_sha256, lora=_lora(tcfg),
        deleted_since=deleted, replay=cfg.replay, seed=job_id,
    )
    if lineage is None and active is None and plan.init_adapter is None:  # a new user's first round
        from ownlm.privacy.community import starting_point

        start = starting_point(store, settings, user_id, base_sha256, _lora(tcfg))  # None unless they opted in
        need = cfg.community_min_gain
        if start is not None and need is not None:
            from ownlm.privacy.community import start_gain

            if base is None or not heldout:
                return replace(plan, why=plan.why + "; the community model was not tried: no held-out examples to judge it")
            g = start_gain(base, start, heldout)
            if g["gain"] < need:
                return replace(plan, why=f"{plan.why}; not from the community model: it lowers your held-out NLL by "
                                         f"{g['gain']:.4f} nats ({g['base_nll']:.4f} -> {g['community_nll']:.4f}), "
                                         f"under community_min_gain {need:g}")
            plan = replace(plan, init_adapter=start, why=f"first round: started from the node's community model (held-out "
                                                         f"NLL {g['base_nll']:.4f} -> {g['community_nll']:.4f})")
        elif start is not None:
            plan = replace(plan, init_adapter=start, why="first round: started from the node's community model")
    return plan


class Scheduler:
    """Checks every user each `interval` seconds and runs due rounds one at a time in a background thread."""

    def __init__(self, store: Store, settings: Settings, on_deployed: Callable[[str], None] | None = None,
                 tick: float | None = None):
        self.store, self.settings, self.on_deployed = store, settings, on_deployed
        self.interval = settings.personalization.interval
        self.tick = tick or min(10.0, self.interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ownlm-loop")
        self.current: str | None = None
        self._rounds: dict[str, threading.Thread] = {}  # with a cluster: the rounds in flight, by job id

    def start(self) -> "Scheduler":
        for job in self.store.open_jobs():  # a restart: resume what a process that is gone was running
            if job["state"] == "running" and (not owner_alive(job["owner"]) or (job["lease_until"] or 0) < time.time()):
                self.store.update_job(job["id"], state="queued", owner=None, lease_until=None,
                                      reason=(job["reason"] or "") + " (resumed after a restart)")
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> bool:
        """Ask the loop to stop and wait up to `timeout` s; False if a round is still running (daemon thread)."""
        self._stop.set()
        self._thread.join(timeout)
        deadline = time.time() + timeout
        for t in list(self._rounds.values()):
            t.join(max(0.0, deadline - time.time()))
        return not self._thread.is_alive() and not any(t.is_alive() for t in self._rounds.values())

    def _dispatch(self) -> None:
        """With a cluster: up to cluster.max_rounds rounds at once, each in its own thread (a round mostly waits for
        its Ray task). One open job per user (store.enqueue_job) keeps it to one round per user."""
        self._rounds = {j: t for j, t in self._rounds.items() if t.is_alive()}
        for job in self.store.open_jobs():
            if self._stop.is_set() or len(self._rounds) >= self.settings.cluster.max_rounds:
                break
            if job["id"] in self._rounds:
                continue
            t = threading.Thread(target=self._run_one, args=(job["id"],), daemon=True, name=f"ownlm-round-{job['id']}")
            self._rounds[job["id"]] = t
            t.start()

    def _run_one(self, job_id: str) -> None:
        try:
            run_job(self.store, self.settings, job_id, self.on_deployed)
        except Exception:
            log.error("scheduler: round %s: %s", job_id, traceback.format_exc())

    def due(self, now: float) -> list[str]:
        """Users whose interval has passed (each then gets a job if it has enough new samples); schedules their
        next check."""
        out = []
        for user in self.store.list_users():
            nxt = self.store.next_run_at(user.id)
            if nxt is None:
                self.store.set_next_run(user.id, now + self.interval)
                continue
            if now < nxt:
                continue
            self.store.set_next_run(user.id, now + self.interval)
            out.append(user.id)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.settings.personalization.enabled:
                    for uid in self.due(time.time()):
                        self.store.enqueue_if_due(uid, self.settings.personalization.min_samples)
                if self.settings.cluster.ray_address:
                    self._dispatch()
                else:
                    for job in self.store.open_jobs():
                        if self._stop.is_set():
                            break
                        self.current = job["id"]
                        run_job(self.store, self.settings, job["id"], self.on_deployed)
                        self.current = None
            except Exception:
                log.error("scheduler: %s", traceback.format_exc())
            self._stop.wait(self.tick)
