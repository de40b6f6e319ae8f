"""One federated round's pieces without the transport: a device's signed update, the server's checks, the
aggregate as one bundle per device, and the device's install. privacy/federation.py carries them over Flower.

Device (each an ownlm home with its own store):
    update, built = make_update(store, settings, user, spec, work, destination="192.168.1.5:9091")
  trains the person's adapter on *this* device's conversations with the loop's own train() (quantization-aware
  by default), turns it into one flat float32 vector (privacy/aggregate.py, by the round's method), multiplies it
  by its weight (the training example count) and signs a header that binds it to
  (user, round id, device id = its node key id, base sha256, method, layout, payload sha256). Only the header and
  the vector leave the device: no text, no token ids, no dataset (tests/test_federation.py checks what the
  server received). `privacy.tiers.check_may_send_update` is called first, with the user's current tier.

Server (the person's aggregating device):
    header = verify_update(store, user, state, header, payload)   # raises UpdateRefused, audited
  A header must be signed by a key that may sign for the user on the server (the device's own user key, trusted
  with `ownlm trust add DEVICE.pem --user NAME`), match its payload's sha256 (else: tampered), name this round
  (a round id the server used before: replayed; any other: wrong round), this user and this base, and come at most
  once per device per round (a second one: replayed). Every refusal is written to the server's audit log as
  `federation_update_refused` with the reason (never content).
    bundles = aggregate_bundles(store, settings, user, state, accepted, mean, work)
  averages, re-quantizes to lora1, and makes one bundle per device (artifact.bundle.make_bundle): signed with
  the person's key on the server, sealed to that device's node key, naming that device's dataset Merkle root.

Device again:
    result = install_aggregate(store, settings, user, bundle, round_id, gate=True)
  opens it (node.install.open_verified: the device must trust the server's key for the user), checks it is the
  aggregate of the round this device sent an update for, optionally judges it on the device's own held-out
  conversations (privacy.remote.install_judged: the same gate as a remote round), and installs it like any
  bundle (node.install.install_verified), so the person's model is the same on every device.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ownlm.artifact.manifest import canonical
from ownlm.artifact.sign import sign_manifest, verify_manifest
from ownlm.errors import InvalidInput, OwnlmError, SignatureError, UpdateRefused
from ownlm.fsutil import mkdir_private
from ownlm.privacy import aggregate as agg
from ownlm.privacy import tiers
from ownlm.settings import Settings
from ownlm.store import Store, User

UPDATE_KIND = "ownlm.federated_update"
UPDATE_VERSION = 1
STARTED, REFUSED, FINISHED = "federation_round_started", "federation_update_refused", "federation_round_finished"


def new_round_id() -> str:
    return "fr_" + time.strftime("%Y%m%d_%H%M%S", time.gmtime()) + "_" + secrets.token_hex(4)


@dataclass
class RoundSpec:
    """What the server asks every device to do in one round (sent in the round's train message)."""

    round_id: str
    user: str
    base_sha256: str
    method: str = "factors"
    lr: float = 1e-3
    max_steps: int | None = 48
    epochs: int = 20
    qat: bool = True
    r: int = 1  # the loop's layout: TrainConfig's r and alpha (tests/test_federation.py keeps them equal)
    alpha: float = 2.0
    anchor_kl: float = 1.0  # the loop's KL(base || personal) anchor weight (personalization.anchor_kl): same drift guard
    secure: bool = False  # the server sums encrypted updates (privacy/secure_agg.py); tier 3 requires it
    # The server may ask every device to train its update with DP-SGD (learn/dp.py, per conversation) at most this
    # epsilon; None asks nothing, and each device follows its own policy (`update_epsilon`: always at tier 0).
    dp_epsilon: float | None = None

    def __post_init__(self) -> None:
        agg.check_method(self.method)
        if self.dp_epsilon is not None and (isinstance(self.dp_epsilon, bool) or not isinstance(self.dp_epsilon, (int, float))
                                            or not 0 < self.dp_epsilon < float("inf")):
            raise InvalidInput(f"the round's dp_epsilon {self.dp_epsilon!r} is not a finite number > 0",
                               hint="give e.g. --epsilon 8, or leave it out")
        if self.method == "latent" and not self.qat:
            raise InvalidInput("the latent method averages quantization-aware latents", hint="keep qat on, or use --method factors")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RoundSpec":
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"the round's settings are malformed ({e})", hint="start the round with ownlm federate server") from None


# --- device side ------------------------------------------------------------------------------------------------


def latent_tensors(checkpoint_root: Path) -> dict:
    """The QAT latents and scales of train()'s final checkpoint, as aggregate.tensors_for('latent') wants them.

    peft + torch parametrization names: base_model.model.<path>.lora_A.default.parametrizations.weight.original
    (the latent W) and ...parametrizations.weight.0.scale (the learned scale)."""
    from ownlm.learn.steps import load_checkpoint

    ckpt = load_checkpoint(checkpoint_root)
    if ckpt is None:
        raise InvalidInput("training left no checkpoint to read the latent weights from", hint="use --method factors")
    out = {}
    for name, t in ckpt[1].items():
        inner = name.removeprefix("base_model.model.")
        for factor in ("lora_A", "lora_B"):
            path, sep, rest = inner.partition(f".{factor}.default.parametrizations.weight.")
            if sep:
                out[f"{path}.{factor}" + ("" if rest == "original" else agg.SCALE)] = t.float()
    if not out:
        raise InvalidInput("the checkpoint holds no quantization-aware latents", hint="train with qat on")
    return out


def local_dataset(store: Store, settings: Settings, user: User, tokenizer):
    """The device's BuiltDataset, as the loop builds it (no redaction needed: no text leaves the device)."""
    from ownlm.learn.dataset import DatasetConfig, build

    conversations, feedback = store.training_view(user.id)
    dcfg = DatasetConfig(min_examples=min(settings.personalization.min_samples, 10), paraphrases=settings.personalization.paraphrases)
    return build(conversations, feedback, tokenizer, dcfg)


def update_epsilon(store: Store, settings: Settings, user: User, spec: RoundSpec, tier: int) -> float | None:
    """The epsilon this device's update spends (None: trained without DP): the smallest of what applies — the
    round's ask, the user's own DP choice (`ownlm privacy dp`), and personalization.federation_dp_epsilon whenever
    the update can be read by a machine that is not one of the person's devices (tier 0: a plaintext update to a
    server anywhere) or personalization.federation_dp is "always".

    Why not always: at tier 1 the server is one of the person's own devices and at tier 3 it sees only
    ciphertexts; the aggregate goes back to the same devices either way, so DP would protect the person from
    themselves, at the cost bench/README.md (dp.py) measured: DP-SGD at ε 8 on one person's ~250 conversations
    kept ~1% of the held-out NLL gain."""
    p = settings.personalization
    own = store.dp_epsilon(user.id)
    asked = [e for e in (spec.dp_epsilon, own) if e]
    if tier == 0 or p.federation_dp == "always":
        asked.append(p.federation_dp_epsilon)
    return min(asked) if asked else None


def train_local(base, built, spec: RoundSpec, work: Path, epsilon: float | None, max_grad_norm: float = 1.0,
                init_adapter: Path | None = None):
    """(train report, factors, latent tensors or None) of this device's round: train() from scratch (or from the
    peft adapter `init_adapter`: a previous aggregate, bench/federated.py --rounds), with DP-SGD at `epsilon` per
    conversation when it is not None (`update_epsilon` decides; the report's `dp` is the budget spent)."""
    from ownlm.bitdelta.lora1 import read_adapter
    from ownlm.learn.dataset import tokenize
    from ownlm.learn.train import TrainConfig, train

    train_ex = tokenize(built.split("train"), base.tokenizer)
    held_ex = tokenize(built.split("heldout"), base.tokenizer)
    tcfg = TrainConfig(r=spec.r, alpha=spec.alpha, lr=spec.lr, epochs=spec.epochs, max_steps=spec.max_steps, qat=spec.qat,
                       anchor_kl=spec.anchor_kl, dp=epsilon is not None, dp_epsilon=epsilon, dp_max_grad_norm=max_grad_norm)
    report = train(base, train_ex, held_ex, tcfg, work / "train", resume=False, dataset={"merkle_root": built.merkle_root},
                   init_adapter=init_adapter)
    factors = read_adapter(work / "train" / "adapter").factors
    latent = latent_tensors(work / "train" / "checkpoint") if spec.method == "latent" else None
    return report, factors, latent


@dataclass
class Update:
    header: dict  # signed (artifact.sign over its canonical JSON); binds the payload by its sha256
    payload: np.ndarray | bytes  # weight * vector: float32 (aggregate.weighted), or its CKKS ciphertexts (secure)
    figures: dict = field(default_factory=dict)  # device-local only (not sent)
    public_context: bytes | None = None  # secure rounds: the person's public CKKS context, for the aggregator


def payload_sha256(payload: np.ndarray | bytes) -> str:
    if isinstance(payload, (bytes, bytearray)):
        return hashlib.sha256(payload).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(payload, dtype="<f4").tobytes()).hexdigest()


def make_update(store: Store, settings: Settings, user: User, spec: RoundSpec, work: Path, *, destination: str | None,
                base=None) -> tuple[Update, object]:
    """Train on this device's conversations and return (the signed update, the BuiltDataset). Nothing is sent
    here; the tier is checked first anyway, so a refused device does not even train."""
    from ownlm.basemodel import load_base
    from ownlm.learn.dataset import config_dict

    tier = store.get_user(user.id).privacy_tier
    tiers.check_may_send_update(tier, destination, secure=spec.secure)
    if spec.secure:  # no key, no round: fail before training
        from ownlm.privacy.secure_agg import device_keys

        device_keys(store, user.id, user.name)
    if spec.user != user.name:
        raise UpdateRefused(f"the round is for user {spec.user}, this device serves {user.name}",
                            hint="join with --user set to the round's user")
    base = base if base is not None else load_base(settings)
    if spec.base_sha256 != base.sha256:
        raise UpdateRefused(f"the round is for base {spec.base_sha256[:16]}…, this device has {base.sha256[:16]}…",
                            hint="every device must serve the same base model (`ownlm info` shows its sha256)")
    built = local_dataset(store, settings, user, base.tokenizer)
    store.save_dataset(user.id, built, config_dict(built.config))  # the right to delete finds the model through it
    mkdir_private(work)
    epsilon = update_epsilon(store, settings, user, spec, tier)
    report, factors, latent = train_local(base, built, spec, work, epsilon, settings.personalization.dp_max_grad_norm)
    tensors = agg.tensors_for(spec.method, factors, latent)
    layout = agg.Layout.of(tensors)
    weight = report.samples
    payload = agg.weighted(layout.flatten(tensors), weight)
    public, key_id = None, None
    from ownlm.privacy import secure_agg as sa

    if spec.secure:  # encrypted to the person's key; the header binds the ciphertext (privacy/securefed.py)
        keys = sa.device_keys(store, user.id, user.name)
        payload, public, key_id = sa.update_for_aggregator(tier, payload, keys.public), keys.public, keys.key_id
    else:
        payload = sa.update_for_aggregator(tier, payload, None)  # refuses a plaintext update at tier 3
    figures = {"samples": report.samples, "tokens": report.tokens, "duration_s": report.duration_s}
    if not spec.secure:  # a secure round tells the aggregator counts only, not how well the device's data fit
        figures.update(loss=report.loss, heldout_samples=report.heldout_samples,
                       heldout_loss_base=report.heldout_loss_base, heldout_loss_personal=report.heldout_loss_personal)
    latest = store.models(user.id)
    node_pub = store.node_key().public_json()
    header = {
        "kind": UPDATE_KIND, "version": UPDATE_VERSION, "user": user.name, "round": spec.round_id,
        "device": node_pub["key_id"], "node_pubkey": node_pub, "base_sha256": base.sha256, "method": spec.method,
        "r": spec.r, "alpha": spec.alpha, "layout": layout.to_json(), "layout_sha256": layout.sha256, "dim": layout.dim,
        "weight": weight, "form": "ckks" if spec.secure else "plaintext", "key_id": key_id,
        "payload_sha256": payload_sha256(payload), "merkle_root": built.merkle_root,
        "max_version": store.max_version(user.id), "previous": latest[0]["id"] if latest else None,
        "figures": figures, "dp": report.dp,
    }
    signed = sign_manifest(header, store.signing_key(user.id))
    with store.tx() as db:  # before it is sent: if anything left the device, the log says so
        store.audit(db, user.id, "federated_update_sent", round=spec.round_id, destination=destination, tier=tier,
                    method=spec.method, examples=weight, merkle_root=built.merkle_root, floats=layout.dim,
                    form=header["form"], epsilon=(report.dp or {}).get("epsilon"), dp=report.dp is not None)
    _remember_round(settings, user, spec.round_id, {"spec": spec.to_json(), "layout_sha256": layout.sha256,
                                                     "merkle_root": built.merkle_root})
    return Update(signed, payload, {"train_loss": report.loss, "heldout_loss_lora": report.heldout_loss_personal},
                  public), built


def _rounds_file(settings: Settings, user: User) -> Path:
    return settings.home / "federation" / f"{user.id}.json"


def _remember_round(settings: Settings, user: User, round_id: str, info: dict) -> None:
    """Keep what this device sent in a round (its settings, layout and dataset root; never the update itself)."""
    from ownlm.fsutil import atomic_write

    path = _rounds_file(settings, user)
    sent = json.loads(path.read_text()) if path.exists() else {"sent": []}
    sent["sent"] = [*sent["sent"], round_id][-100:]
    sent["info"] = {r: i for r, i in {**sent.get("info", {}), round_id: info}.items() if r in sent["sent"]}
    atomic_write(path, json.dumps(sent))


def sent_rounds(settings: Settings, user: User) -> list[str]:
    path = _rounds_file(settings, user)
    return json.loads(path.read_text())["sent"] if path.exists() else []


def sent_round(settings: Settings, user: User, round_id: str) -> dict:
    """This device's record of a round it sent an update to; UpdateRefused for any other round."""
    path = _rounds_file(settings, user)
    info = (json.loads(path.read_text()).get("info", {}) if path.exists() else {}).get(round_id)
    if info is None:
        raise UpdateRefused(f"this device sent no update for round {round_id}",
                            hint="install only the aggregate of a round this device sent an update to")
    return info


def install_aggregate(store: Store, settings: Settings, user: User, bundle: bytes, round_id: str, *, gate: bool = True):
    """Verify and install the round's aggregate on this device; returns node.InstallResult. With `gate`, the
    device's own held-out conversations judge it first (QualityGateRefused installs nothing)."""
    from ownlm.node.install import install_verified, open_verified
    from ownlm.privacy.remote import install_judged

    verified = open_verified(store, settings, bundle, expect_user_id=user.id)
    fed = verified.manifest.get("federation")
    if not isinstance(fed, dict) or fed.get("round") != round_id or round_id not in sent_rounds(settings, user):
        raise UpdateRefused(f"the bundle is not the aggregate of round {round_id} this device took part in",
                            hint="install only the aggregate of a round this device sent an update to")
    with store.tx() as db:
        store.audit(db, user.id, "federated_model_received", round=round_id, model=verified.model_id,
                    method=fed.get("method"), devices=len(fed.get("devices") or []))
    if gate:
        from ownlm.basemodel import load_base

        built = local_dataset(store, settings, user, load_base(settings).tokenizer)
        return install_judged(store, settings, user, built, verified, source=f"federation round {round_id}",
                              audit_action="federated_model_judged")
    return install_verified(store, settings, verified, keep=settings.personalization.keep_versions)


# --- server side ------------------------------------------------------------------------------------------------


@dataclass
class RoundState:
    """The server's view of one round: what it asked for and which devices it accepted."""

    spec: RoundSpec
    past_rounds: set[str]
    accepted: dict[str, dict] = field(default_factory=dict)  # device id -> header
    layout_sha256: str | None = None
    key_id: str | None = None  # secure rounds: the person's CKKS key every update is encrypted under


def past_rounds(store: Store, user: User) -> set[str]:
    rows = store.query("SELECT detail FROM audit WHERE user_id = ? AND action = ?", (user.id, STARTED))
    return {json.loads(d).get("round") for (d,) in rows}


def start_round(store: Store, user: User, spec: RoundSpec, devices: int) -> RoundState:
    """Record the round as started (its id then counts as used: an update naming it later is a replay)."""
    before = past_rounds(store, user)
    if spec.round_id in before:
        raise UpdateRefused(f"round {spec.round_id} was already run", hint="start a new round (a new round id)")
    with store.tx() as db:
        store.audit(db, user.id, STARTED, round=spec.round_id, method=spec.method, devices=devices, secure=spec.secure)
    return RoundState(spec, before)


def _refuse(store: Store, user: User, state: RoundState, header: object, reason: str, hint: str) -> UpdateRefused:
    device = header.get("device") if isinstance(header, dict) else None
    with store.tx() as db:
        store.audit(db, user.id, REFUSED, round=state.spec.round_id, device=str(device)[:64] if device else None,
                    claimed_round=str(header.get("round"))[:64] if isinstance(header, dict) else None, reason=reason)
    return UpdateRefused(f"update from device {device} refused: {reason}", hint=hint)


def verify_update(store: Store, user: User, state: RoundState, header: object, payload: np.ndarray | bytes,
                  public_context: bytes | None = None) -> dict:
    """Accept one device's update into `state` or raise UpdateRefused (written to the audit log).

    A secure round (spec.secure) accepts only CKKS payloads (`bytes`), all under one key, each with the public
    context (`public_context`) the aggregator adds them with; any other round only float32 vectors."""
    def refuse(reason: str, hint: str = "send a fresh update from `ownlm federate join` for this round"):
        return _refuse(store, user, state, header, reason, hint)

    if not isinstance(header, dict) or header.get("kind") != UPDATE_KIND or header.get("version") != UPDATE_VERSION:
        raise refuse("not a federated update header")
    try:
        verify_manifest(header, store.signers_for(user.id))
    except SignatureError as e:
        raise refuse(f"signature: {e.message}", e.hint or "") from None
    spec = state.spec
    form = header.get("form", "plaintext")
    if (form == "ckks") != spec.secure or isinstance(payload, (bytes, bytearray)) != spec.secure:
        raise refuse(f"a {form} update in a {'secure' if spec.secure else 'plaintext'} round",
                     "every device of a secure round encrypts its update (ownlm federate key import)")
    if spec.secure:
        from ownlm.privacy.secure_agg import context_id, public_context as check_public, read_header

        try:
            clear = read_header(bytes(payload))  # n and key id; the values stay encrypted
        except OwnlmError:
            raise refuse("tampered: the payload is not a CKKS update") from None
        n, context = clear.get("n"), clear.get("context")
        try:
            check_public(public_context or b"")  # refuses a context carrying the secret key
        except OwnlmError:
            raise refuse("its public context is missing, malformed or carries a secret key") from None
        if context_id(public_context) != context:
            raise refuse("tampered: its public context is not the key its payload is encrypted under")
    else:
        payload = np.asarray(payload)
        n, context = (payload.shape[0] if payload.ndim == 1 else -1), None
    if (not spec.secure and payload.dtype != np.float32) or payload_sha256(payload) != header.get("payload_sha256"):
        raise refuse("tampered: the payload does not match the sha256 its device signed")
    if context != header.get("key_id"):
        raise refuse("tampered: the payload is encrypted under another key than its header names")
    if spec.secure and state.key_id is not None and context != state.key_id:
        raise refuse("encrypted under another key than the other devices' updates",
                     "every device imports the same key (ownlm federate key export / import)")
    rid = header.get("round")
    if rid != spec.round_id:
        if rid in state.past_rounds:
            raise refuse(f"replayed: the update was made for the earlier round {rid}")
        raise refuse(f"wrong round: the update names round {str(rid)[:64]}, this is {spec.round_id}")
    if header.get("user") != user.name:
        raise refuse(f"wrong user: the update is for {str(header.get('user'))[:64]}")
    if header.get("base_sha256") != spec.base_sha256:
        raise refuse("wrong base: the update was trained on another base model", "every device must serve the same base")
    if header.get("method") != spec.method or header.get("r") != spec.r or header.get("alpha") != spec.alpha:
        raise refuse("wrong settings: method, r or alpha differ from the round's")
    node_pub = header.get("node_pubkey")
    if not isinstance(node_pub, dict) or node_pub.get("key_id") != header.get("device"):
        raise refuse("the device id is not its node key's id")
    if header["device"] in state.accepted:
        raise refuse("replayed: this device already sent its update for this round")
    layout = agg.Layout.from_json(header.get("layout"))
    if layout.sha256 != header.get("layout_sha256") or layout.dim != n:
        raise refuse("tampered: the layout does not match its payload")
    if state.layout_sha256 is not None and layout.sha256 != state.layout_sha256:
        raise refuse("its adapter layout differs from the other devices'", "train every device with the same LoRA settings")
    w = header.get("weight")
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise refuse("its weight is not a positive example count")
    dp = header.get("dp")
    eps = dp.get("epsilon") if isinstance(dp, dict) else None
    if dp is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf")):
        raise refuse("malformed differential-privacy budget")
    if spec.dp_epsilon is not None and (dp is None or eps > spec.dp_epsilon * (1 + 1e-9)):
        raise refuse("no differential privacy: the round asks for DP-SGD" if dp is None else
                     f"no differential privacy within the round's budget: ε {eps:.3g}, the round allows {spec.dp_epsilon}",
                     "the device must train its update with DP-SGD at the round's epsilon or less")
    state.layout_sha256, state.key_id = layout.sha256, context
    state.accepted[header["device"]] = header
    return header


def aggregate_bundles(store: Store, settings: Settings, user: User, state: RoundState, mean: np.ndarray,
                      work: Path, base_name: str) -> tuple[dict[str, bytes], dict]:
    """The mean vector of the accepted updates -> (device id -> its sealed bundle, the figures). One delta,
    one version; each device's bundle names its own dataset Merkle root and previous model."""
    from ownlm.artifact.bundle import make_bundle
    from ownlm.bitdelta import save_delta

    spec, headers = state.spec, list(state.accepted.values())
    layout = agg.Layout.from_json(headers[0]["layout"])
    factors = agg.to_factors(spec.method, layout.unflatten(mean), spec.r)
    delta = agg.to_delta(factors, spec.r, spec.alpha, spec.base_sha256)
    save_delta(delta, work / "delta")
    weights = {h["device"]: h["weight"] for h in headers}
    total = sum(weights.values())

    def mean_of(key: str):
        vals = [(h["figures"].get(key), h["weight"]) for h in headers]
        vals = [(v, w) for v, w in vals if isinstance(v, (int, float))]
        return sum(v * w for v, w in vals) / sum(w for _, w in vals) if vals else None

    report = {"samples": total, "tokens": sum(h["figures"].get("tokens") or 0 for h in headers),
              "duration_s": max(h["figures"].get("duration_s") or 0 for h in headers), "loss": mean_of("loss"),
              "heldout_loss_base": mean_of("heldout_loss_base"),
              # no single LoRA was trained to this aggregate: the node's gate judges it without a fidelity figure
              "heldout_loss_personal": None, "dp": combined_dp({h["device"]: h["dp"] for h in headers})}
    version = max(h["max_version"] for h in headers) + 1
    fed = {"round": spec.round_id, "method": spec.method, "devices": sorted(weights), "weights": weights}
    created = time.time()
    bundles = {}
    for h in headers:
        data, manifest = make_bundle(
            delta_dir=work / "delta", report={**report, "dataset": {"merkle_root": h["merkle_root"]}}, user_name=user.name,
            signing_key=store.signing_key(user.id), recipient=h["node_pubkey"], base_name=base_name, version=version,
            previous=h.get("previous"), created_at=created, federation=fed)
        bundles[h["device"]] = data
    figures = {"round": spec.round_id, "method": spec.method, "model": manifest["model"]["id"], "version": version,
               "devices": sorted(weights), "weights": weights, "bundle_bytes": len(data),
               "device_heldout_loss_lora": {h["device"]: h["figures"].get("heldout_loss_personal") for h in headers}}
    return bundles, figures


def combined_dp(budgets: dict[str, dict | None]) -> dict | None:
    """The aggregate's `training.dp` from each device's update budget ({device id: learn/dp.py Budget dict, or
    None for an update trained without DP}); None when no device used DP.

    Each conversation lives on one device and enters only that device's update, and averaging is
    post-processing, so the aggregate protects every conversation at its own device's (epsilon, delta): the
    record states the largest of them (None, i.e. unbounded, when some device trained without DP), and each
    device's."""
    used = {d: b for d, b in budgets.items() if b is not None}
    if not used:
        return None
    return {"epsilon": max(b["epsilon"] for b in used.values()) if len(used) == len(budgets) else None,
            "delta": max(b["delta"] for b in used.values()), "unit": next(iter(used.values())).get("unit", "conversation"),
            "covers": "adapter weights", "scope": "federated: each device's update trained on its own conversations",
            "devices": {d: None if b is None else {"epsilon": b["epsilon"], "delta": b["delta"], "steps": b.get("steps")}
                        for d, b in budgets.items()}}


def header_text(header: dict) -> str:
    return canonical(header).decode()

