"""The node side of remote training (privacy tiers 0 and 2): send a redacted dataset, install what comes back.

    result = train_remotely(store, settings, user, built_dataset)      # trainer_url/ca_file from settings.remote

In order, and nothing is sent before its check passes:
1. the user's *current* tier is read from the store and `privacy.check_may_send` is called first: tier 1 (edge)
   and tier 3 refuse here, before any connection is opened;
2. the dataset must have been built with redaction on (`DatasetConfig(redact=True)`);
3. the trainer is reached over HTTPS only, its certificate verified against `ca_file` (hostname included);
   an unverifiable certificate refuses the job (RemoteTrainerError);
4. tier 2 only: a fresh nonce goes to the trainer, its attestation evidence is verified against the node's
   policy and must bind the trainer's HPKE public key and the nonce (`ownlm.privacy.attest`); only then may data go;
5. the job (examples, training settings, this node's HPKE public key, user name, base sha256) is sealed with
   HPKE to the trainer's key, the transfer is written to the audit log (destination, Merkle root, example
   count — never content), and sent;
6. the returned bundle is audited and verified (`node.open_verified`): it must be signed by a key this node
   trusts for this user (`store.trust(trainer's PEM, user_id=...)`, `ownlm trust add FILE --user NAME`),
   sealed to this node, for this user and base;
7. the quality gate runs on the node (`gate.judge_bundle`: held-out NLL against the base, drift, fidelity
   against the LoRA loss the trainer signed, the user's reply habits); a refusal raises QualityGateRefused and installs nothing;
   otherwise `node.install_verified` installs it. Remote rounds always train from scratch (the trainer keeps nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import ssl
from pathlib import Path

import httpx

from ownlm.privacy import tiers as privacy
from ownlm.errors import AttestationFailed, ConfigError, PrivacyViolation, QualityGateRefused, RemoteTrainerError
from ownlm.settings import Settings
from ownlm.store import Store, User


def _ssl_context(ca_file: Path | str | None) -> ssl.SSLContext:
    if ca_file is None:
        raise ConfigError("no CA file for the remote trainer's certificate",
                          hint="set remote.ca_file (OWNLM_REMOTE__CA_FILE) to the PEM of the CA that signed it")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load CA file {ca_file} ({e})", hint="remote.ca_file must be a PEM CA certificate") from None
    ctx.check_hostname, ctx.verify_mode = True, ssl.CERT_REQUIRED  # the defaults, stated
    return ctx


def _unwrap_tls(e: Exception) -> ssl.SSLError | None:
    seen = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class TrainerClient:
    """HTTPS to one trainer with certificate verification; turns transport failures into RemoteTrainerError."""

    def __init__(self, url: str, ca_file: Path | str | None, timeout_s: float):
        if not url.startswith("https://"):
            raise ConfigError(f"trainer URL {url!r} is not https://", hint="data goes to a trainer only over verified TLS")
        self.url = url.rstrip("/")
        self.client = httpx.Client(base_url=self.url, verify=_ssl_context(ca_file),
                                   timeout=httpx.Timeout(30.0, read=timeout_s), trust_env=False)

    def __enter__(self) -> "TrainerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as e:
            tls = _unwrap_tls(e)
            if tls is not None:
                raise RemoteTrainerError(f"the trainer's TLS certificate does not verify ({tls}); nothing was sent",
                                         hint="check remote.trainer_url's host name and that remote.ca_file holds the CA "
                                              "that signed the trainer's certificate") from None
            raise RemoteTrainerError(f"cannot reach the trainer at {self.url} ({type(e).__name__}: {e})",
                                     hint="check remote.trainer_url and that `ownlm trainer` runs there") from None
        if r.status_code != 200:
            try:
                err = r.json()["error"]
                why = f"{err['type']}: {err['message']}" + (f" ({err['hint']})" if err.get("hint") else "")
            except (ValueError, KeyError, TypeError):
                why = r.text[:200]
            raise RemoteTrainerError(f"the trainer answered {r.status_code} to {method} {path}: {why}",
                                     hint="see the trainer's log")
        return r


def job_document(user: User, built, node_pubkey: dict, base_sha256: str, settings: Settings, version: int,
                 previous: str | None) -> dict:
    """The job.json a trainer receives (see ownlm.privacy.trainer)."""
    cfg = settings.personalization
    return {
        "version": 1, "user": user.name, "base_sha256": base_sha256, "node_pubkey": node_pubkey,
        "train_config": {"lr": cfg.lr, "epochs": cfg.epochs, "max_steps": cfg.max_steps, "time_budget_s": cfg.time_budget_s,
                         "qat": cfg.qat},
        "merkle_root": built.merkle_root, "model_version": version, "previous": previous,
        "examples": [{"conversation_id": e.conversation_id, "split": e.split, "messages": e.messages} for e in built.examples],
    }


def check_tier(store: Store, user: User, destination: str | None) -> int:
    """The user's current tier; raises PrivacyViolation right away where it forbids any remote step (1, 3)."""
    tier = store.get_user(user.id).privacy_tier  # the current tier, not the one `user` was read with
    if tier != 2:  # tier 2 may talk to the trainer (for evidence) but sends data only after it verifies
        privacy.check_may_send(tier, destination or "a remote trainer")
    return tier


def remote_round(store: Store, settings: Settings, user: User, **kw):
    """One round on the remote trainer from the user's stored conversations (redacted dataset); see train_remotely.
    The tier is checked before the dataset is even built."""
    check_tier(store, user, kw.get("trainer_url") or settings.remote.trainer_url)
    built = redacted_dataset(store, settings, user)
    return built, train_remotely(store, settings, user, built, **kw)


def redacted_dataset(store: Store, settings: Settings, user: User):
    """The user's stored conversations as the BuiltDataset a trainer outside this process gets: redaction on,
    the loop's other dataset settings."""
    from ownlm.basemodel import load_tokenizer
    from ownlm.learn.dataset import DatasetConfig, build

    conversations, feedback = store.training_view(user.id)
    dcfg = DatasetConfig(min_examples=min(settings.personalization.min_samples, 10), redact=True,
                         paraphrases=settings.personalization.paraphrases)
    return build(conversations, feedback, load_tokenizer(settings), dcfg)


def attestation_setup(settings: Settings, policy=None, verifier=None):
    """Tier 2's (policy, verifier): the caller's, else the policy file in settings.remote.attestation_policy and
    the verifier it names. Raises AttestationFailed when there is none (nothing may be sent then)."""
    from ownlm.privacy.attest import AttestationPolicy, verifier_for

    if policy is None:
        if settings.remote.attestation_policy is None:
            raise AttestationFailed("tier 2 needs an attestation policy and none is configured; nothing was sent",
                                    hint="set remote.attestation_policy to a JSON policy file")
        policy = AttestationPolicy.from_file(settings.remote.attestation_policy)
    return policy, verifier if verifier is not None else verifier_for(policy)


def train_remotely(store: Store, settings: Settings, user: User, built, trainer_url: str | None = None,
                   ca_file: Path | str | None = None, *, verifier=None, policy=None):
    """Train `built` (a redacted BuiltDataset of `user`) on the remote trainer and install the result.

    Returns node.InstallResult. Raises PrivacyViolation (tier forbids it, or no redaction), RemoteTrainerError
    (TLS or trainer failure), AttestationFailed (tier 2 evidence), or any install error of the bundle.
    `verifier`/`policy` (tier 2) default to the policy file in settings.remote.attestation_policy.
    """
    from ownlm.artifact.seal import load_public, seal
    from ownlm.basemodel import base_sha256, resolve_base
    from ownlm.node.install import install_verified, open_verified

    url = trainer_url or settings.remote.trainer_url
    destination = url or "a remote trainer"
    tier = check_tier(store, user, url)
    if not built.config.redact:
        raise PrivacyViolation(f"refused to send an unredacted dataset to {destination}",
                               hint="build the dataset with redaction on (DatasetConfig(redact=True))")
    if url is None:
        raise ConfigError("no remote trainer configured", hint="set remote.trainer_url (OWNLM_REMOTE__TRAINER_URL)")
    if tier == 2:
        policy, verifier = attestation_setup(settings, policy, verifier)

    with TrainerClient(url, ca_file if ca_file is not None else settings.remote.ca_file, settings.remote.timeout_s) as tc:
        trainer_pub = tc.request("GET", "/trainer/pubkey").json()
        _, trainer_kid = load_public(trainer_pub)
        detail: dict = {"destination": url, "tier": tier, "trainer_key": trainer_kid}
        if tier == 2:
            from ownlm.privacy.attest import NONCE_BYTES, verify_evidence

            nonce = secrets.token_bytes(NONCE_BYTES)
            evidence = tc.request("GET", "/trainer/attestation", params={"nonce": nonce.hex()}).json()
            claims = verify_evidence(evidence, policy, verifier, trainer_pub, nonce)
            privacy.check_may_send(tier, destination, attested=True)
            detail.update(tee=claims.tee, measurement=claims.measurement, tcb_status=claims.tcb_status, verifier=verifier.name)
        else:
            privacy.check_may_send(tier, destination)

        latest = store.models(user.id)
        base_sha = base_sha256(resolve_base(settings.base), settings.home)
        doc = job_document(user, built, store.node_key().public_json(), base_sha, settings,
                           store.max_version(user.id) + 1, latest[0]["id"] if latest else None)
        sealed = seal({"job.json": json.dumps(doc, ensure_ascii=False).encode()}, trainer_pub)
        del doc
        # The dataset is recorded like a local round's: the model that comes back names its Merkle root, and
        # the right to delete finds through it which conversations the model learned (Store.delete_data).
        from ownlm.learn.dataset import config_dict

        store.save_dataset(user.id, built, config_dict(built.config))
        with store.tx() as db:  # recorded before sending: if anything left the machine, the log says so
            store.audit(db, user.id, "remote_training_sent", merkle_root=built.merkle_root,
                        examples=len(built.examples), bytes=len(sealed), **detail)
        bundle = tc.request("POST", "/trainer/jobs", content=sealed,
                            headers={"Content-Type": "application/octet-stream"}).content
    with store.tx() as db:
        store.audit(db, user.id, "remote_bundle_received", destination=url, bytes=len(bundle),
                    sha256=hashlib.sha256(bundle).hexdigest())
    # The same quality gate as a local round, measured here on the node's own held-out conversations: a model
    # trained elsewhere is never deployed on the trainer's word that it is better.
    verified = open_verified(store, settings, bundle, expect_user_id=user.id)
    return install_judged(store, settings, user, built, verified, source=url, audit_action="remote_model_judged")


def install_judged(store: Store, settings: Settings, user: User, built, verified, *, source: str, audit_action: str,
                   figures: dict | None = None, lock=contextlib.nullcontext()):
    """The node's gate on a verified bundle trained elsewhere (`judge_received`), audited as `audit_action`
    (figures, never content); installs it, or raises QualityGateRefused and installs nothing. `figures` gets the
    verdict; `lock` is held while judging (the cluster judges one round at a time)."""
    from ownlm.node.install import install_verified

    with lock:
        verdict = judge_received(settings, built, verified)
    with store.tx() as db:
        store.audit(db, user.id, audit_action, model=verified.model_id, passed=verdict["passed"],
                    reason=verdict["reason"], heldout_loss_base=verdict["heldout_loss_base"],
                    heldout_loss_compressed=verdict["heldout_loss_compressed"], kl_drift=verdict["kl_drift"])
    if figures is not None:
        figures.update(verdict)
    if not verdict["passed"]:
        raise QualityGateRefused(f"the model from {source} failed the quality gate: {verdict['reason']}; "
                                 "the previous model keeps serving", hint="capture more conversations or adjust the "
                                 "gate (personalization.gate_*), then train again")
    return install_verified(store, settings, verified, keep=settings.personalization.keep_versions)


def judge_received(settings: Settings, built, verified) -> dict:
    """The node's quality gate on a bundle trained elsewhere (a remote trainer or a Ray worker), on `built`'s
    held-out conversations."""
    from ownlm.basemodel import load_base
    from ownlm.learn.dataset import tokenize
    from ownlm.evaluate.gate import behaviour_prompts, judge_bundle

    base = load_base(settings)
    held = tokenize(built.split("heldout"), base.tokenizer)
    if not held:
        raise QualityGateRefused("no held-out conversations to judge the received model on; nothing was installed",
                                 hint="capture at least 2 conversations before training")
    return judge_bundle(base, verified, held, settings.personalization,
                        behaviour=behaviour_prompts(built.split("train"), built.split("heldout")),
                        repetition_penalty=settings.repetition_penalty)
