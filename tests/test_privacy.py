"""Privacy tiers 0-2 enforced: remote training over verified TLS (tier 0), refused on tier 1, attested on tier 2.

A real trainer app (`ownlm.api.trainer_app`) runs under uvicorn with TLS on 127.0.0.1, with certificates made
here by a test CA; the node side is `ownlm.privacy.remote.train_remotely` on a real store, tiny model, 2 steps.
"""

from __future__ import annotations

import os

import pytest

from ownlm.privacy import remote, trainer as trainer_mod
from ownlm.api.trainer_app import create_trainer_app
from ownlm.privacy.attest import AttestationPolicy, InsecureTestAttester, InsecureTestVerifier, report_data
from ownlm.basemodel import load_tokenizer
from ownlm.learn.dataset import DatasetConfig, build
from ownlm.errors import (
    AttestationFailed, DeltaMismatch, PrivacyViolation, QualityGateRefused, RemoteTrainerError, SignatureError,
)
from ownlm.privacy.tiers import set_tier
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.tls import CertAuthority, RequestLog, TLSThreadServer

MARKER = "QUOKKA-7731-MARKER"
MEASUREMENT = "ab" * 48


def settings_for(home, tiny_base):
    s = load_settings(home=str(home), base=str(tiny_base), device="cpu")
    return s.model_copy(update={"personalization": s.personalization.model_copy(
        update={"max_steps": 2, "lr": 5e-3, "gate_max_kl": 10.0, "gate_behaviour": False, "qat": False,
        # a 2-step post-hoc lora1 of the tiny random model keeps 45-50% of its gain: the fidelity check is test_loop's
        "gate_min_fidelity": 0.0})})


def conversations() -> dict:
    convs = {}
    for i in range(12):
        convs[f"c{i:02d}"] = [
            {"id": f"m{i}a", "parent_id": None, "role": "user",
             "content": f"Question {i} about {MARKER}: mail me at bob{i}@example.com"},
            {"id": f"m{i}b", "parent_id": f"m{i}a", "role": "assistant", "content": f"Answer {i}: {MARKER} is a small animal."},
        ]
    return convs


@pytest.fixture
def pki(tmp_path):
    ca = CertAuthority(tmp_path / "pki", "trusted")
    return ca, ca.issue("trainer")


@pytest.fixture
def node(home, tiny_base):
    settings = settings_for(home, tiny_base)
    store = Store(home)
    built = build(conversations(), {}, load_tokenizer(settings), DatasetConfig(min_examples=2, heldout_fraction=0.2))
    yield settings, store, built
    store.close()


@pytest.fixture
def make_trainer(tmp_path, tiny_base):
    def make(attester=None, name="trainer-home"):
        return trainer_mod.Trainer(settings_for(tmp_path / name, tiny_base), attester=attester)
    return make


def serve(t, cert):
    app = RequestLog(create_trainer_app(t))
    return app, TLSThreadServer(app, *cert)


def files_containing(root, needle: bytes) -> list:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p) and needle in open(p, "rb").read():
                hits.append(p)
    return hits


def actions(store, user_id):
    return {a["action"]: a["detail"] for a in reversed(store.audit_log(user_id, limit=100))}


def test_tier0_trains_remotely_over_verified_tls_and_the_trainer_erases_the_job(node, make_trainer, pki, monkeypatch):
    settings, store, built = node
    user = store.create_user("ann", tier=0)
    t = make_trainer()
    store.trust(t.signing_key_pem(), label="test trainer", user_id=user.id)
    seen_jobs = []
    real_parse = trainer_mod.parse_job
    monkeypatch.setattr(trainer_mod, "parse_job", lambda raw: seen_jobs.append(raw) or real_parse(raw))
    ca, cert = pki
    app, srv = serve(t, cert)
    with srv:
        res = remote.train_remotely(store, settings, user, built, srv.url, ca.pem)
    assert res.version == 1 and store.active_model(user.id)["id"] == res.model_id
    # the trainer got the data, redacted: the marker yes, the e-mail addresses no
    assert len(seen_jobs) == 1 and MARKER.encode() in seen_jobs[0]
    assert b"example.com" not in seen_jobs[0] and b"[EMAIL]" in seen_jobs[0]
    assert ("POST", "/trainer/jobs") in app.seen
    # ... and kept nothing of it: no file under the trainer's home holds the marker or the dataset's Merkle root
    # (the root is in the training report the job dir holds while it runs), and no job dir is left
    assert files_containing(t.settings.home, MARKER.encode()) == []
    assert files_containing(t.settings.home, built.merkle_root.encode()) == []
    assert list((t.settings.home / "trainer" / "jobs").iterdir()) == []
    # the transfer and the receipt are audited (what, where, how much; never content)
    log = actions(store, user.id)
    sent = log["remote_training_sent"]
    assert sent["destination"] == srv.url and sent["merkle_root"] == built.merkle_root
    assert sent["examples"] == len(built.examples) and sent["tier"] == 0
    assert log["remote_bundle_received"]["destination"] == srv.url and log["remote_bundle_received"]["bytes"] > 0
    assert "model_installed" in log and log["remote_model_judged"]["passed"] is True
    assert MARKER not in str(store.audit_log(user.id, limit=100))


def test_a_remote_model_that_fails_the_gate_on_the_node_is_not_installed(node, make_trainer, pki):
    settings, store, built = node
    strict = settings.model_copy(update={"personalization": settings.personalization.model_copy(
        update={"gate_min_gain": 0.99})})  # the trainer is not asked: the node measures and refuses
    user = store.create_user("ann", tier=0)
    t = make_trainer()
    store.trust(t.signing_key_pem(), label="test trainer", user_id=user.id)
    ca, cert = pki
    with serve(t, cert)[1] as srv:
        with pytest.raises(QualityGateRefused, match="failed the quality gate: held-out NLL .* does not beat"):
            remote.train_remotely(store, strict, user, built, srv.url, ca.pem)
    assert store.active_model(user.id) is None and store.models(user.id) == []
    judged = actions(store, user.id)["remote_model_judged"]
    assert judged["passed"] is False and judged["heldout_loss_compressed"] < judged["heldout_loss_base"]
    assert "model_installed" not in actions(store, user.id)


def test_bundle_from_an_untrusted_trainer_is_not_installed(node, make_trainer, pki):
    settings, store, built = node
    user = store.create_user("ann", tier=0)
    ca, cert = pki
    with serve(make_trainer(), cert)[1] as srv:
        with pytest.raises(SignatureError, match="does not trust"):
            remote.train_remotely(store, settings, user, built, srv.url, ca.pem)
    assert store.active_model(user.id) is None


@pytest.mark.parametrize("case", ["stranger_ca", "wrong_host"])
def test_unverifiable_certificate_refuses_the_job(node, make_trainer, pki, tmp_path, case):
    settings, store, built = node
    user = store.create_user("ann", tier=0)
    ca, cert = pki
    if case == "stranger_ca":  # the trainer's certificate is signed by a CA the node does not know
        cert = CertAuthority(tmp_path / "stranger", "stranger").issue("trainer")
    else:  # signed by the right CA, but for another host name
        cert = ca.issue("elsewhere", dns=["trainer.example.org"], ips=[])
    app, srv = serve(make_trainer(), cert)
    with srv:
        with pytest.raises(RemoteTrainerError, match="TLS certificate does not verify"):
            remote.train_remotely(store, settings, user, built, srv.url, ca.pem)
    assert app.seen == []  # the handshake failed: not one request, let alone data
    assert "remote_training_sent" not in actions(store, user.id)


def test_http_url_is_refused(node):
    settings, store, built = node
    user = store.create_user("ann", tier=0)
    with pytest.raises(Exception, match="https"):
        remote.train_remotely(store, settings, user, built, "http://127.0.0.1:9", "ca.pem")


def test_unredacted_dataset_is_refused(node, tiny_base):
    settings, store, _ = node
    user = store.create_user("ann", tier=0)
    raw = build(conversations(), {}, load_tokenizer(settings), DatasetConfig(min_examples=2, redact=False))
    with pytest.raises(PrivacyViolation, match="unredacted"):
        remote.train_remotely(store, settings, user, raw, "https://127.0.0.1:9", "ca.pem")


@pytest.mark.parametrize("tier", [1, 3])
def test_tier1_and_3_send_nothing(node, make_trainer, pki, tier):
    settings, store, built = node
    user = store.create_user("ann", tier=tier)
    ca, cert = pki
    t = make_trainer(attester=InsecureTestAttester(MEASUREMENT))
    app, srv = serve(t, cert)
    with srv:
        with pytest.raises(PrivacyViolation, match=f"tier {tier}"):
            remote.train_remotely(store, settings, user, built, srv.url, ca.pem)
        # even with an attestation policy and verifier at hand (the tier-2 path), nothing is contacted
        with pytest.raises(PrivacyViolation, match=f"tier {tier}"):
            remote.train_remotely(store, settings, user, built, srv.url, ca.pem, verifier=InsecureTestVerifier(),
                                  policy=AttestationPolicy(allowed_measurements=[MEASUREMENT]))
    assert app.seen == []
    assert "remote_training_sent" not in actions(store, user.id)


def test_lowered_tier_is_read_at_send_time(node, make_trainer, pki):
    """A User object read while the tier was 0 does not let data out after the user raised it to 1."""
    settings, store, built = node
    user = store.create_user("ann", tier=0)
    set_tier(store, user, 1, confirm=False)
    ca, cert = pki
    app, srv = serve(make_trainer(), cert)
    with srv:
        with pytest.raises(PrivacyViolation, match="tier 1"):
            remote.train_remotely(store, settings, user, built, srv.url, ca.pem)
    assert app.seen == []
    assert actions(store, user.id)["privacy_tier_changed"] == {"old": 0, "new": 1}


def test_trainer_refuses_a_job_for_another_base_and_erases_it(node, make_trainer):
    settings, store, built = node
    user = store.create_user("ann", tier=0)
    t = make_trainer()
    doc = remote.job_document(user, built, store.node_key().public_json(), "00" * 32, settings, 1, None)
    import json

    from ownlm.artifact.seal import seal

    with pytest.raises(DeltaMismatch, match="base"):
        t.run(seal({"job.json": json.dumps(doc).encode()}, t.pubkey()))
    assert files_containing(t.settings.home, MARKER.encode()) == []


# --- tier 2 -------------------------------------------------------------------------------------------------

class OtherKeyAttester(InsecureTestAttester):
    """Evidence that binds some other key than the one the trainer offers (a man in the middle)."""

    def evidence(self, pubkey_json, nonce):
        return {**super().evidence(pubkey_json, nonce), "report_data": report_data({"other": "key"}, nonce).hex()}


class ReplayAttester(InsecureTestAttester):
    """Evidence recorded once, replayed for every nonce."""

    def evidence(self, pubkey_json, nonce):
        return super().evidence(pubkey_json, b"\x01" * 32)


def test_tier2_sends_only_after_attestation_binds_key_and_nonce(node, make_trainer, pki):
    settings, store, built = node
    user = store.create_user("ann", tier=2)
    t = make_trainer(attester=InsecureTestAttester(MEASUREMENT))
    store.trust(t.signing_key_pem(), user_id=user.id)
    ca, cert = pki
    app, srv = serve(t, cert)
    policy = AttestationPolicy(allowed_measurements=[MEASUREMENT])
    with srv:
        res = remote.train_remotely(store, settings, user, built, srv.url, ca.pem, verifier=InsecureTestVerifier(), policy=policy)
    assert res.version == 1
    paths = [p for _, p in app.seen]
    assert paths.index("/trainer/attestation") < paths.index("/trainer/jobs")
    sent = actions(store, user.id)["remote_training_sent"]
    assert sent["tier"] == 2 and sent["measurement"] == MEASUREMENT and sent["verifier"] == "insecure-test"
    assert files_containing(t.settings.home, MARKER.encode()) == []


@pytest.mark.parametrize("attester,policy_measurement,match", [
    (OtherKeyAttester(MEASUREMENT), MEASUREMENT, "does not bind the trainer's public key"),
    (ReplayAttester(MEASUREMENT), MEASUREMENT, "nonce"),
    (InsecureTestAttester(MEASUREMENT), "cd" * 48, "not in the policy's allow-list"),
    (InsecureTestAttester(MEASUREMENT, tcb_status="OutOfDate"), MEASUREMENT, "TCB status OutOfDate"),
])
def test_tier2_refuses_bad_evidence_before_sending(node, make_trainer, pki, attester, policy_measurement, match):
    settings, store, built = node
    user = store.create_user("ann", tier=2)
    ca, cert = pki
    app, srv = serve(make_trainer(attester=attester), cert)
    with srv:
        with pytest.raises(AttestationFailed, match=match):
            remote.train_remotely(store, settings, user, built, srv.url, ca.pem, verifier=InsecureTestVerifier(),
                                  policy=AttestationPolicy(allowed_measurements=[policy_measurement]))
    assert ("POST", "/trainer/jobs") not in app.seen
    assert "remote_training_sent" not in actions(store, user.id)


def test_tier2_without_evidence_or_policy_sends_nothing(node, make_trainer, pki):
    settings, store, built = node
    user = store.create_user("ann", tier=2)
    ca, cert = pki
    app, srv = serve(make_trainer(attester=None), cert)
    with srv:
        with pytest.raises(AttestationFailed, match="needs an attestation policy"):
            remote.train_remotely(store, settings, user, built, srv.url, ca.pem)
        with pytest.raises(RemoteTrainerError, match="no TEE"):
            remote.train_remotely(store, settings, user, built, srv.url, ca.pem, verifier=InsecureTestVerifier(),
                                  policy=AttestationPolicy(allowed_measurements=[MEASUREMENT]))
    assert ("POST", "/trainer/jobs") not in app.seen


def test_trainer_erases_the_job_when_it_fails_midway(node, make_trainer, monkeypatch):
    settings, store, built = node
    user = store.create_user("ann", tier=0)
    t = make_trainer()
    import json

    from ownlm.evaluate import gate
    from ownlm.artifact.seal import seal

    def boom(*a, **k):
        raise RuntimeError("compression crashed")

    monkeypatch.setattr(gate, "compress_adapter", boom)  # after training wrote its adapter and report
    doc = remote.job_document(user, built, store.node_key().public_json(), t.base.sha256, settings, 1, None)
    with pytest.raises(RuntimeError, match="compression crashed"):
        t.run(seal({"job.json": json.dumps(doc).encode()}, t.pubkey()))
    assert files_containing(t.settings.home, built.merkle_root.encode()) == []
    assert list((t.settings.home / "trainer" / "jobs").iterdir()) == []


def test_remote_settings_and_cli(tmp_path, monkeypatch):
    from tests.conftest import run_cli

    monkeypatch.setenv("OWNLM_REMOTE__TRAINER_URL", "https://trainer.example:8443/")
    monkeypatch.setenv("OWNLM_REMOTE__CA_FILE", str(tmp_path / "ca.pem"))
    s = load_settings()
    assert s.remote.trainer_url == "https://trainer.example:8443" and s.remote.ca_file == tmp_path / "ca.pem"
    monkeypatch.setenv("OWNLM_REMOTE__TRAINER_URL", "http://trainer.example")
    with pytest.raises(Exception, match="https://"):
        load_settings()
    out = run_cli("trainer", "--help")
    assert out.returncode == 0 and "--ssl-certfile" in out.stdout


def test_cli_remote_round_on_tier1_contacts_nobody(home, node, make_trainer, pki):
    """`ownlm train --remote` (a second remote path) under the default tier 1: refused, the trainer sees nothing."""
    from tests.conftest import run_cli

    settings, store, _ = node
    store.create_user("me")  # default tier 1
    store.close()
    ca, cert = pki
    app, srv = serve(make_trainer(), cert)
    with srv:
        out = run_cli("train", "--remote", env={"OWNLM_REMOTE__TRAINER_URL": srv.url, "OWNLM_REMOTE__CA_FILE": str(ca.pem),
                                               "OWNLM_BASE": str(settings.base)})
    assert out.returncode == 1 and "tier 1 (edge)" in out.stderr and srv.url in out.stderr, out.stderr
    assert app.seen == []


def test_remote_round_from_the_store_on_tier0(home, node, make_trainer, pki):

    settings, store, _ = node
    user = store.create_user("ann", tier=0)
    from ownlm.capture.importers import parse_file
    from ownlm.store.imports import import_into
    from ownlm.evaluate.personas.fixtures import DATA_DIR

    path = home.parent / "bram.jsonl"
    path.write_text("\n".join((DATA_DIR / "bram.jsonl").read_text().splitlines()[:30]))
    import_into(store, user.id, parse_file(path), "bram")
    t = make_trainer()
    store.trust(t.signing_key_pem(), user_id=user.id)
    ca, cert = pki
    with serve(t, cert)[1] as srv:
        built, res = remote.remote_round(store, settings, user, trainer_url=srv.url, ca_file=ca.pem)
    assert built.config.redact and res.version == 1
    assert actions(store, user.id)["remote_training_sent"]["merkle_root"] == built.merkle_root


KILLED_TRAINER = """
import sys
from pathlib import Path
from tests.test_privacy import settings_for
from ownlm.privacy.trainer import Trainer

home, base, job = sys.argv[1:4]
s = settings_for(Path(home), base)
s = s.model_copy(update={"personalization": s.personalization.model_copy(update={"max_steps": 400})})
Trainer(s).run(Path(job).read_bytes())
"""


def test_a_trainer_killed_mid_job_resumes_from_its_sealed_checkpoint(node, tiny_base, tmp_path):
    """SIGKILL of a trainer process after its first checkpoint: the same job run again on that trainer resumes from
    the sealed checkpoint (the bundle's manifest says from which step), which held no plaintext and is gone after."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from ownlm.artifact.seal import open_bundle, seal
    from ownlm.privacy.checkpoints import job_id

    settings, store, built = node
    user = store.create_user("ann", tier=0)
    home = tmp_path / "trainer-home"
    t = trainer_mod.Trainer(settings_for(home, tiny_base))  # creates the trainer's keys
    doc = remote.job_document(user, built, store.node_key().public_json(), t.base.sha256, settings, 1, None)
    doc["train_config"]["max_steps"] = 400  # long enough to be killed mid-way
    job = tmp_path / "job.sealed"
    job.write_bytes(seal({"job.json": json.dumps(doc).encode()}, t.pubkey()))
    sealed_ckpt = home / "trainer" / "checkpoints" / (job_id(doc) + ".sealed")

    proc = subprocess.Popen([sys.executable, "-c", KILLED_TRAINER, str(home), str(tiny_base), str(job)],
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        deadline = time.time() + 120
        while not sealed_ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sealed_ckpt.exists(), "the trainer never sealed a checkpoint"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    kept = sealed_ckpt.read_bytes()
    for plain in (MARKER.encode(), b"lora_A", b"__metadata__", built.merkle_root.encode()):
        assert plain not in kept  # ciphertext only: no text, no tensor names, not even the dataset's root

    bundle = t.run(job.read_bytes())  # the rerun: a new trainer process would do the same (it has the same keys)
    manifest = json.loads(open_bundle(bundle, store.node_key())["manifest.json"])
    assert manifest["training"]["resumed_from_step"] >= trainer_mod.CHECKPOINT_EVERY_STEPS
    assert not sealed_ckpt.exists() and list((home / "trainer" / "jobs").iterdir()) == []
    assert files_containing(home, built.merkle_root.encode()) == []


def test_a_sealed_checkpoint_that_does_not_open_is_dropped(tmp_path):
    from ownlm.artifact.seal import NodeKey
    from ownlm.privacy.checkpoints import SealedCheckpoints

    ck = SealedCheckpoints(tmp_path / "ck", NodeKey.generate())
    jid = "ab" * 32
    ck.path(jid).parent.mkdir(parents=True)
    ck.path(jid).write_bytes(b"not a sealed file")
    assert ck.restore(jid, tmp_path / "restored") is False and not ck.path(jid).exists()
    with pytest.raises(ValueError):
        ck.path("../../etc/passwd")
