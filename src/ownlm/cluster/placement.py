"""Where a user's round may run on the cluster, decided on the node before anything is sealed or submitted.

The user's *current* tier (read from the store at placement time) picks the candidates:
- tier 0 (cloud): any live worker;
- tier 1 (edge): only this machine's own Ray node — the raylet the node's driver is attached to — which must
  also carry `cluster.head_resource`. The resource alone is a label anyone could give another machine; being
  the driver's own node is what keeps the data on this machine, and the resource is the operator's statement
  that this machine is meant to take rounds;
- tier 2 (TEE): only workers whose fresh attestation evidence verifies against the node's policy and binds
  their trainer key and a new nonce (privacy/attest.py), asked one by one until one verifies;
- tier 3 (homomorphic): nowhere; PrivacyViolation, and the round never reaches Ray.
Then every candidate must be able to take the round's resource request, and its trainer's signing key must be
trusted for the user (`ownlm trust add FILE --user NAME`, store.trust): a bundle signed by any other key would be
refused after training, so such a worker is not sent the data in the first place.

Among the rest the node takes the one with the fewest of its rounds in flight; on a tie it prefers a worker
to the head, whose cores also serve chat and tier-1 rounds. The job is then sealed to that one worker's key
and pinned to it (hard node affinity): no other node could open it.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field

from ownlm.errors import AttestationFailed, ConfigError, PrivacyViolation
from ownlm.privacy import tiers as privacy
from ownlm.privacy.remote import attestation_setup
from ownlm.settings import Settings
from ownlm.store import Store, User

IDENTITY_TIMEOUT_S = 120.0  # the first call on a node starts a Ray worker process (seconds on 2 cores)
_in_flight: dict[str, int] = {}  # node id -> this process's rounds running there
_in_flight_lock = threading.Lock()


@dataclass
class Worker:
    node_id: str
    address: str
    resources: dict
    own_node: bool  # the Ray node this process (the node's driver) is attached to: this machine
    identity: dict = field(repr=False)  # the agent's answer: hpke, signing_pem, signer, attests, pid
    agent: object = field(repr=False)

    @property
    def label(self) -> str:
        return f"ray node {self.node_id[:12]} ({self.address})"


def workers(ray) -> list[Worker]:
    """Every live Ray node with its trainer's identity (asked of the node's pinned agent)."""
    from ownlm.cluster.agent import agent_for

    own = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    agents = [agent_for(n["NodeID"]) for n in nodes]
    try:
        identities = ray.get([a.identity.remote() for a in agents], timeout=IDENTITY_TIMEOUT_S)
    except Exception as e:  # a node dying while asked, a worker that cannot start: say which step failed
        raise ConfigError(f"cannot ask the cluster's trainers for their keys ({type(e).__name__}: {e})",
                          hint="check that every worker can import ownlm and has a valid OWNLM_HOME") from None
    return [Worker(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})), n["NodeID"] == own, i, a)
            for n, i, a in zip(nodes, identities, agents)]


def _fits(w: Worker, settings: Settings) -> bool:
    cfg = settings.cluster
    return w.resources.get("CPU", 0) >= cfg.cpus_per_round and w.resources.get("GPU", 0) >= cfg.gpus_per_round


def candidates(store: Store, settings: Settings, user: User, tier: int, found: list[Worker]) -> list[Worker]:
    """The workers that tier, resources and trust allow (before attestation); raises with the reason if none."""
    cfg = settings.cluster
    if tier == 1:
        found = [w for w in found if w.own_node]
        if not found or cfg.head_resource not in found[0].resources:
            raise ConfigError(f"tier 1 keeps data on this machine, and this machine's Ray node has no "
                              f"{cfg.head_resource!r} resource", hint="start this machine's raylet with --resources "
                              f"'{{\"{cfg.head_resource}\": 1}}' (cluster.head_resource), or train without the cluster")
    fit = [w for w in found if _fits(w, settings)]
    if not fit:
        raise ConfigError(f"no Ray node{' on this machine' if tier == 1 else ''} has {cfg.cpus_per_round:g} CPUs and "
                          f"{cfg.gpus_per_round:g} GPUs for a round", hint="lower cluster.cpus_per_round / gpus_per_round "
                          "or add workers")
    trusted = set(store.signers_for(user.id))
    ok = [w for w in fit if w.identity["signer"] in trusted]
    if not ok:
        raise ConfigError(f"no eligible Ray worker's trainer key is trusted for user {user.name} "
                          f"({', '.join(w.label + ' signs as ' + w.identity['signer'] for w in fit)})",
                          hint=f"trust the worker's signing key for the user: `ownlm trust add FILE --user {user.name}`")
    return ok


def _order(found: list[Worker]) -> list[Worker]:
    with _in_flight_lock:
        return sorted(found, key=lambda w: (_in_flight.get(w.node_id, 0), w.own_node, w.node_id))


def attested(ray, found: list[Worker], policy, verifier) -> tuple[Worker, dict]:
    """The first worker (in placement order) whose evidence verifies; AttestationFailed with every reason if none."""
    from ownlm.privacy.attest import NONCE_BYTES, verify_evidence

    why = []
    for w in found:
        if not w.identity["attests"]:
            why.append(f"{w.label}: no TEE")
            continue
        nonce = secrets.token_bytes(NONCE_BYTES)
        evidence = ray.get(w.agent.attestation.remote(nonce), timeout=IDENTITY_TIMEOUT_S)
        try:
            claims = verify_evidence(evidence, policy, verifier, w.identity["hpke"], nonce)
        except AttestationFailed as e:
            why.append(f"{w.label}: {e.message}")
            continue
        return w, {"tee": claims.tee, "measurement": claims.measurement, "tcb_status": claims.tcb_status,
                   "verifier": verifier.name}
    raise AttestationFailed("tier 2: no Ray worker's attestation verifies, nothing was sent (" + "; ".join(why) + ")",
                            hint="run the trainer in a TEE whose measurement the policy allows, or change the tier")


def place(ray, store: Store, settings: Settings, user: User, *, verifier=None, policy=None,
          exclude: list[str] = ()) -> tuple[Worker, dict]:
    """The worker for `user`'s round and the audit detail of that choice; raises before anything is sent.
    `exclude`: node ids not to use (nodes that died under this round)."""
    tier = store.get_user(user.id).privacy_tier
    if tier == 3:
        privacy.check_may_send(3, "the Ray cluster")  # raises: tier 3 never sends plaintext anywhere
    if tier == 2:
        policy, verifier = attestation_setup(settings, policy, verifier)
    ordered = _order(candidates(store, settings, user, tier, [w for w in workers(ray) if w.node_id not in exclude]))
    detail: dict = {"tier": tier}
    if tier == 2:
        chosen, claims = attested(ray, ordered, policy, verifier)
        privacy.check_may_send(2, chosen.label, attested=True)
        detail.update(claims)
    else:
        chosen = ordered[0]
        if tier == 0:
            privacy.check_may_send(0, chosen.label)
        elif not chosen.own_node:  # tier 1: candidates() kept only this machine's node; say so if that ever breaks
            raise PrivacyViolation(f"refused to send tier-1 data to {chosen.label}", hint="this is a bug: report it")
    detail.update(destination=chosen.label, node_id=chosen.node_id, trainer_key=chosen.identity["signer"])
    return chosen, detail


class slot:
    """Counts a round in flight on a node while it runs (what `_order` balances on)."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    def __enter__(self) -> "slot":
        with _in_flight_lock:
            _in_flight[self.node_id] = _in_flight.get(self.node_id, 0) + 1
        return self

    def __exit__(self, *exc) -> None:
        with _in_flight_lock:
            _in_flight[self.node_id] -= 1
