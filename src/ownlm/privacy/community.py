"""The community model (issue #20 item 4): many users' DP-noised, pairwise-masked adapter updates summed into one
shared adapter that a node offers new users as a starting point. Opt-in twice, both off by default
(store.set_community): `contribute` (tiers 0 and 3 only) and `start` (a new user's first round starts from it).

One round (in-process / file-based here: the Flower transport of privacy/federation.py carries one *person's*
devices, not several people; a community transport would carry exactly these headers and uint64 vectors):

    roster = Roster(round_id, base_sha256, r, alpha, members={i: Member(mask_public, signer_pem)}, method="latent")
        # every participant's X25519 public key for this round and its signing key are known to all
    header, masked = contribute(store, user, roster, i, mask_private, factors, report.dp, latent_of(train_dir))
        # on each participant's node: the DP-trained factors (learn/dp.py; epsilon recorded) flattened in the
        # shared layout, pairwise-masked (privacy/secure_agg.py) and the header signed, bound to the round
    agg = Aggregator(roster); agg.accept(header, masked) ...; mean = agg.mean()
        # the aggregator (no store, no keys): checks signatures, round, replays; sees only masked uint64 vectors;
        # `unmask_sum` refuses an incomplete round (masks do not cancel) instead of publishing garbage
    publish(store, settings, user, roster, mean, agg.result())  # the node: the 1-bit lora1 adapter + a signed manifest
    starting_point(store, settings, user_id, ...)    # the peft adapter for init_adapter, only if the user opted in

`python -m ownlm.privacy.community aggregate DIR` runs the aggregator on a directory (roster.json,
NNN.header.json + NNN.masked.u64) and writes mean.f32 + result.json: what tests/test_community.py runs as a process.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ownlm.errors import InvalidInput, NotFound, PrivacyViolation, SignatureError, UpdateRefused
from ownlm.privacy import aggregate as agg
from ownlm.privacy import secure_agg as sa
from ownlm.privacy.tiers import check_update_form

KIND, MODEL_KIND, VERSION = "ownlm.community_contribution", "ownlm.community_model", 1
ALLOWED_TIERS = (0, 3)
# How contributions are averaged (privacy/aggregate.py): "latent", the QAT latent weights and scales, is what
# bench/federated.py measured to match each device's own model, where averaging the factors ("factors") lost
# 0.03-0.1 nats; "factors" stays for contributors trained without QAT.
METHODS = ("latent", "factors")
DIR = "community"


# --- policy ---------------------------------------------------------------------------------------------------


def check_tier(tier: int) -> None:
    """Contributing is for tiers 0 (cloud) and 3 (masked, never plaintext) only."""
    if tier not in ALLOWED_TIERS:
        what = {1: "tier 1 (edge) keeps every update on your own devices",
                2: "tier 2 (TEE) has no attested aggregator for shared models"}.get(tier, f"tier {tier}")
        raise PrivacyViolation(f"refused to join the community model: {what}",
                               hint="contributing needs tier 0 or 3 (`ownlm privacy set 3`); starting from the "
                                    "community model (`ownlm community start`) needs no contribution")


def set_choice(store, user, *, contribute: bool | None = None, start: bool | None = None) -> dict:
    """Opt in or out (audited). Joining as a contributor is refused at tiers 1 and 2."""
    if contribute:
        check_tier(store.get_user(user.id).privacy_tier)
    return store.set_community(user.id, contribute=contribute, start=start)


# --- the round --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    mask_public: str  # hex of the raw X25519 public key for this round
    signer_pem: str  # the participant's signing public key (PEM)


@dataclass
class Roster:
    round_id: str
    base_sha256: str
    r: int
    alpha: float
    members: dict[int, Member] = field(default_factory=dict)
    method: str = "latent"  # one of METHODS; every participant contributes in it

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInput(f"the community round's method {self.method!r} is not one of {', '.join(METHODS)}",
                               hint="start the round with method latent (QAT contributors) or factors")

    def publics(self) -> dict[int, bytes]:
        return {i: bytes.fromhex(m.mask_public) for i, m in self.members.items()}

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "members": {str(i): asdict(m) for i, m in self.members.items()}}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Roster":
        try:
            d = json.loads(text)
            return cls(d["round_id"], d["base_sha256"], int(d["r"]), float(d["alpha"]),
                       {int(i): Member(**m) for i, m in d["members"].items()}, str(d["method"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidInput(f"the community round's roster is malformed ({e})", hint="start a new round") from None


def payload_sha256(masked: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(masked, dtype="<u8").tobytes()).hexdigest()


def contribute(store, user, roster: Roster, index: int, mask_private: bytes, factors: dict, dp: dict | None,
               latent: dict | None = None) -> tuple[dict, np.ndarray]:
    """This participant's signed header and masked uint64 vector. Refuses unless the user opted in, the tier
    allows it, and the factors were trained with DP (the epsilon goes into the header and the model's manifest).
    `latent`: the QAT latents of the same training (`latent_of`), which a round of method "latent" needs."""
    if not store.community(user.id)["contribute"]:
        raise PrivacyViolation("this user has not opted in to the community model", hint="`ownlm community join`")
    tier = store.get_user(user.id).privacy_tier
    check_tier(tier)
    check_update_form(tier, "masked", shared=True)
    if not isinstance(dp, dict) or not isinstance(dp.get("epsilon"), (int, float)) or not math.isfinite(dp["epsilon"]):
        raise PrivacyViolation("a community contribution must be trained with differential privacy (finite ε)",
                               hint="train it with TrainConfig(dp=True, dp_epsilon=...)")
    if index not in roster.members:
        raise InvalidInput(f"participant {index} is not in round {roster.round_id}", hint="use your roster index")
    if any(a.shape[0] != roster.r or b.shape[1] != roster.r for a, b in factors.values()):
        raise InvalidInput(f"the adapter's rank is not the round's r={roster.r}", hint="train with the round's LoRA settings")
    if roster.method == "latent" and latent is None:
        raise InvalidInput("this community round averages quantization-aware latents, and none were given",
                           hint="train with qat on and pass latent_of(training dir), or use a round of method factors")
    tensors = agg.tensors_for(roster.method, factors, latent)
    layout = agg.Layout.of(tensors)
    masked = sa.masked(layout.flatten(tensors), index, mask_private, roster.publics(), roster.round_id)
    header = {"kind": KIND, "version": VERSION, "round": roster.round_id, "index": index, "base_sha256": roster.base_sha256,
              "r": roster.r, "alpha": roster.alpha, "method": roster.method, "layout": layout.to_json(), "layout_sha256": layout.sha256,
              "dim": layout.dim, "payload_sha256": payload_sha256(masked), "epsilon": float(dp["epsilon"]),
              "delta": dp.get("delta")}
    from ownlm.artifact.sign import sign_manifest

    signed = sign_manifest(header, store.signing_key(user.id))
    with store.tx() as db:
        store.audit(db, user.id, "community_contribution_sent", round=roster.round_id, tier=tier,
                    epsilon=header["epsilon"], floats=layout.dim)
    return signed, masked


def latent_of(train_dir: Path) -> dict:
    """The QAT latents and scales of a train() run in `train_dir` (its checkpoint), for `contribute`."""
    from ownlm.privacy.fedupdate import latent_tensors

    return latent_tensors(Path(train_dir) / "checkpoint")


class Aggregator:
    """The aggregator's whole view of a round: the roster and masked vectors. It holds nothing secret."""

    def __init__(self, roster: Roster, past_rounds: set[str] = frozenset()):
        self.roster, self.past = roster, set(past_rounds)
        self.headers: dict[int, dict] = {}
        self.vectors: dict[int, np.ndarray] = {}
        self.refused: list[dict] = []  # {index, reason}: the node writes each to its audit log (publish)
        self.layout_sha256: str | None = None

    def accept(self, header: object, masked: np.ndarray) -> None:
        from ownlm.artifact.sign import load_public, verify_manifest

        idx = header.get("index") if isinstance(header, dict) else None

        def refuse(reason: str) -> UpdateRefused:
            self.refused.append({"index": idx if isinstance(idx, int) else None, "reason": reason})
            return UpdateRefused(f"community contribution {idx} refused: {reason}",
                                 hint="send a fresh contribution for this round")

        if not isinstance(header, dict) or header.get("kind") != KIND or header.get("version") != VERSION:
            raise refuse("not a community contribution header")
        member = self.roster.members.get(idx) if isinstance(idx, int) else None
        if member is None:
            raise refuse("its index is not in the round's roster")
        pub = load_public(member.signer_pem)
        from ownlm.artifact.sign import key_id

        try:
            verify_manifest(header, {key_id(pub): pub})
        except SignatureError as e:
            raise refuse(f"signature: {e.message}") from None
        masked = np.asarray(masked)
        if masked.dtype != np.uint64 or masked.ndim != 1 or payload_sha256(masked) != header.get("payload_sha256"):
            raise refuse("tampered: the masked vector does not match the sha256 its participant signed")
        rid = header.get("round")
        if rid != self.roster.round_id:
            raise refuse(f"replayed: made for the earlier round {rid}" if rid in self.past else f"wrong round {str(rid)[:64]}")
        if idx in self.headers:
            raise refuse("replayed: this participant already contributed to this round")
        if (header.get("base_sha256"), header.get("r"), header.get("alpha"), header.get("method")) != \
                (self.roster.base_sha256, self.roster.r, self.roster.alpha, self.roster.method):
            raise refuse("wrong base model, LoRA settings or averaging method")
        layout = agg.Layout.from_json(header.get("layout"))
        if layout.sha256 != header.get("layout_sha256") or layout.dim != masked.shape[0]:
            raise refuse("tampered: the layout does not match its vector")
        if self.layout_sha256 not in (None, layout.sha256):
            raise refuse("its adapter layout differs from the other participants'")
        eps = header.get("epsilon")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps):
            raise refuse("no differential-privacy budget (ε) recorded")
        self.layout_sha256 = layout.sha256
        self.headers[idx], self.vectors[idx] = header, masked

    def mean(self) -> np.ndarray:
        """The plain mean of everyone's update; InvalidInput (masks do not cancel) unless all members reported."""
        total = sa.unmask_sum(self.vectors, set(self.roster.members))
        return (total / np.float32(len(self.roster.members))).astype(np.float32)

    def result(self) -> dict:
        """What the aggregator reports (and the community manifest may say): counts, budgets, the layout and the
        refusals; no names, no data roots."""
        first = self.headers[min(self.headers)] if self.headers else {}
        return {"round": self.roster.round_id, "participants": len(self.headers),
                "epsilons": [self.headers[i]["epsilon"] for i in sorted(self.headers)], "refusals": self.refused,
                "layout": first.get("layout"), "complete": set(self.headers) == set(self.roster.members)}


# --- the node: the community model as a signed artifact and a starting point --------------------------------------


def _dir(settings) -> Path:
    return settings.home / DIR


def _signers(store) -> dict:
    keys: dict = {}
    for u in store.list_users():
        keys.update(store.signers_for(u.id))
    return keys


def publish(store, settings, publisher, roster: Roster, mean: np.ndarray, result: dict) -> dict:
    """The round's mean as "the community model" of this node: the 1-bit lora1 delta, the peft adapter a first
    round starts from, and a manifest signed with the publishing user's key. Every refused contribution is audited."""
    from ownlm.artifact.sign import sign_manifest
    from ownlm.bitdelta import save_delta
    from ownlm.fsutil import atomic_write, mkdir_private
    from ownlm.node.export import write_peft

    with store.tx() as db:
        for r in result["refusals"]:
            store.audit(db, publisher.id, "community_contribution_refused", round=roster.round_id, **r)
    if not result["complete"] or result["round"] != roster.round_id:
        raise InvalidInput("the round is incomplete: the masks do not cancel, nothing is published",
                           hint="every participant must contribute; redo the round")
    layout = agg.Layout.from_json(result["layout"])
    delta = agg.to_delta(agg.to_factors(roster.method, layout.unflatten(mean), roster.r), roster.r, roster.alpha,
                         roster.base_sha256)
    out = _dir(settings) / roster.round_id
    mkdir_private(out)
    save_delta(delta, out / "delta")
    write_peft(delta, Path(str(settings.base or "")), out / "adapter")
    manifest = {"kind": MODEL_KIND, "version": VERSION, "round": roster.round_id, "participants": result["participants"],
                "epsilons": result["epsilons"], "base_sha256": roster.base_sha256,
                "r": roster.r, "alpha": roster.alpha, "method": roster.method, "created_at": time.time(),
                "adapter_sha256": hashlib.sha256((out / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()}
    signed = sign_manifest(manifest, store.signing_key(publisher.id))
    atomic_write(out / "manifest.json", json.dumps(signed, indent=2))
    atomic_write(_dir(settings) / "current", roster.round_id)
    with store.tx() as db:
        store.audit(db, publisher.id, "community_model_published", round=roster.round_id,
                    participants=manifest["participants"])
    return signed


def current(store, settings) -> tuple[dict, Path]:
    """(verified manifest, peft adapter directory) of the node's community model; NotFound when there is none."""
    from ownlm.artifact.sign import verify_manifest

    pointer = _dir(settings) / "current"
    if not pointer.is_file():
        raise NotFound("this node has no community model", hint="run a community round first")
    out = _dir(settings) / pointer.read_text().strip()
    manifest = json.loads((out / "manifest.json").read_text())
    verify_manifest(manifest, _signers(store))
    weights = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    if manifest.get("kind") != MODEL_KIND or hashlib.sha256(weights).hexdigest() != manifest.get("adapter_sha256"):
        raise SignatureError("the community adapter does not match its signed manifest", hint="publish it again")
    return manifest, out / "adapter"


def starting_point(store, settings, user_id: str, base_sha256: str, lora: dict) -> Path | None:
    """The community adapter for this user's first round, or None: only if the user opted in (`start`), a
    verified community model exists, and it fits this base and LoRA setting. A user who did not opt in never gets it."""
    if not store.community(user_id)["start"]:
        return None
    try:
        manifest, adapter = current(store, settings)
    except NotFound:
        return None
    from ownlm.bitdelta.lora1 import read_adapter

    ad = read_adapter(adapter)
    if manifest["base_sha256"] != base_sha256 or ad.r != lora["r"] or ad.alpha != lora["alpha"] \
            or sorted(ad.target_modules) != sorted(lora["target_modules"]):
        return None
    return adapter


def start_gain(base, adapter: Path, heldout: list) -> dict:
    """Whether the community adapter is worth starting from, measured on the new user's own held-out examples
    (learn.dataset tokenized Examples): {"base_nll", "community_nll", "gain"} in nats per assistant token, the
    adapter taken as the lora1 artifact it is served as (a QAT round trains through the same quantizer)."""
    import tempfile

    from ownlm.evaluate.gate import compress_adapter
    from ownlm.evaluate.metrics import assistant_nll, delta_applied

    with tempfile.TemporaryDirectory(prefix="ownlm-community-") as tmp:
        delta = compress_adapter(adapter, Path(tmp) / "delta", base)
    base_nll = assistant_nll(base.model, heldout).mean_nll
    with delta_applied(base.model, delta, base.sha256):
        community_nll = assistant_nll(base.model, heldout).mean_nll
    return {"base_nll": round(base_nll, 4), "community_nll": round(community_nll, 4),
            "gain": round(base_nll - community_nll, 4)}


# --- the aggregator as a process on a directory ------------------------------------------------------------------


def aggregate_dir(d: Path) -> dict:
    roster = Roster.from_json((d / "roster.json").read_text())
    a = Aggregator(roster)
    for h in sorted(d.glob("*.header.json")):
        stem = h.name.removesuffix(".header.json")
        try:
            a.accept(json.loads(h.read_text()), np.frombuffer((d / f"{stem}.masked.u64").read_bytes(), dtype="<u8"))
        except UpdateRefused:
            pass
    result = a.result()
    try:
        (d / "mean.f32").write_bytes(a.mean().astype("<f4").tobytes())
    except InvalidInput as e:
        result["error"] = e.message
    (d / "result.json").write_text(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":  # python -m ownlm.privacy.community aggregate DIR
    if len(sys.argv) != 3 or sys.argv[1] != "aggregate":
        sys.exit("usage: python -m ownlm.privacy.community aggregate DIR")
    print(json.dumps(aggregate_dir(Path(sys.argv[2]))))
