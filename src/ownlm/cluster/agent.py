"""The worker side of a cluster round: each Ray node is an ownlm trainer (privacy/trainer.py) of its own.

A worker is configured like any trainer, on its own machine: the environment of its `ray start` names its
home (`OWNLM_HOME`, with `settings.toml` for the base model, device, threads), where its trainer keys live
(`home/trainer/keys.json`, 0600). Ray's worker processes inherit that environment, so every process Ray starts
on that node acts as the same trainer and nothing about the worker's identity travels from the node.

Two things run there:
- `TrainerAgent`, one small actor per Ray node, pinned to it (NodeAffinitySchedulingStrategy, soft=False) and
  named after the node id. It answers who the trainer on that node is — its HPKE public key (jobs are sealed to
  it), its signing key's PEM (the node must trust it for the user) and, asked with a nonce, its attestation
  evidence (tier 2). Why an actor and not the round task itself: the node must know the key *before* it seals
  a job, and an actor answers that without loading a model or taking a CPU (num_cpus=0); and why pinned: an
  answer about "some node" would let the node seal a job to a key held elsewhere than where the task runs.
- `run_round`, the round task (a sealed job in, a sealed signed bundle out): `Trainer.run`, which erases the
  job's work directory whatever happens. If the process is SIGKILLed mid-round, the next trainer process on
  that node erases what it left (`erase_stale_jobs`), and Ray reruns the task there (max_retries), which resumes
  from the job's last sealed checkpoint (privacy/checkpoints.py).

Attestation evidence comes from the worker's own environment (`OWNLM_TRAINER_ATTESTER`), never from the node:
evidence the node could choose would prove nothing. Only the test attester exists so far
(`insecure-test:<measurement hex>`), and the node accepts its evidence only with the test verifier, which no
policy file can select (privacy/attest.py).
"""

from __future__ import annotations

import os
import time

import ray

from ownlm.artifact import sign
from ownlm.errors import ConfigError
from ownlm.privacy.checkpoints import SealedCheckpoints
from ownlm.privacy.trainer import Trainer, TrainerKeys, erase_stale_jobs
from ownlm.settings import load_settings

AGENT_PREFIX = "ownlm-trainer-"
ATTESTER_ENV = "OWNLM_TRAINER_ATTESTER"
_trainers: dict[str, Trainer] = {}  # per worker process: Ray reuses processes, so the base is loaded once


def attester_from_env():
    """The attester this worker's environment names, or None (no TEE: tier-2 rounds never come here)."""
    spec = os.environ.get(ATTESTER_ENV, "").strip()
    if not spec:
        return None
    kind, _, arg = spec.partition(":")
    if kind == "insecure-test" and arg:
        from ownlm.privacy.attest import InsecureTestAttester

        return InsecureTestAttester(arg)
    raise ConfigError(f"{ATTESTER_ENV}={spec!r} names no attester this ownlm has",
                      hint="unset it (the worker then takes no tier-2 rounds); only 'insecure-test:<hex>' exists, for tests")


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0, max_restarts=-1)
class TrainerAgent:
    """Who the trainer on this Ray node is. It never receives a job or any user data."""

    def __init__(self):
        settings = load_settings()
        self.keys = TrainerKeys.load_or_create(settings.home)
        self.attester = attester_from_env()
        self.jobs_dir = settings.home / "trainer" / "jobs"
        self.checkpoints = SealedCheckpoints(settings.home / "trainer" / "checkpoints", self.keys.hpke)
        erase_stale_jobs(self.jobs_dir)  # what a killed round left, before anything else
        self.checkpoints.erase_stale()

    def identity(self) -> dict:
        return {"node_id": _node_id(), "pid": os.getpid(), "hpke": self.keys.hpke.public_json(),
                "signing_pem": sign.public_pem(self.keys.signing), "signer": sign.key_id(self.keys.signing),
                "attests": self.attester is not None}

    def sweep(self, job_ids: list[str] = ()) -> int:
        """Erase what killed rounds left on this node now (the node asks after a round's worker died), and the sealed
        checkpoints of `job_ids`, rounds the node has given up on."""
        for jid in job_ids:
            self.checkpoints.erase(jid)
        return len(erase_stale_jobs(self.jobs_dir))

    def attestation(self, nonce: bytes) -> dict | None:
        """Evidence binding this trainer's HPKE key and the node's `nonce` (as Trainer.attestation), or None."""
        return None if self.attester is None else self.attester.evidence(self.keys.hpke.public_json(), nonce)


def agent_for(node_id: str):
    """The agent of `node_id`, started there if it is not running yet (one per node: named, get_if_exists)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return TrainerAgent.options(
        name=AGENT_PREFIX + node_id, get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()


@ray.remote
def run_round(sealed_job: bytes, node_id: str) -> dict:
    """One round on this worker: the sealed bundle and where it ran (the node checks both). The resource request,
    the pinning to `node_id` and max_retries are set by the node at submission (cluster/round.py)."""
    here = _node_id()
    if here != node_id:  # cannot happen with hard affinity; if it did, this trainer could not open the job anyway
        raise ConfigError(f"a round sealed for Ray node {node_id[:12]} was started on {here[:12]}",
                          hint="the cluster ignored the round's node affinity: check the Ray version")
    settings = load_settings()
    key = str(settings.home)
    if key not in _trainers:
        _trainers[key] = Trainer(settings)
    cpu0 = time.process_time()
    bundle = _trainers[key].run(sealed_job)
    # CPU seconds of this process (all its threads) for the job: what capacity planning (bench/cluster.py) needs
    return {"bundle": bundle, "node_id": here, "pid": os.getpid(), "cpu_s": round(time.process_time() - cpu0, 3)}
