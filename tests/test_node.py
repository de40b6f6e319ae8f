"""Artifacts and the node: signing, sealing, verified atomic install, refusals, rollback, kill -9 mid-install."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from ownlm.api.app import create_app
from ownlm.artifact.bundle import make_bundle
from ownlm.artifact.manifest import model_id, signed_bytes
from ownlm.artifact.seal import NodeKey, open_bundle
from ownlm.artifact.sign import generate, public_pem, sign_manifest, verify_manifest
from ownlm.errors import AuthError, CorruptArtifact, DeltaMismatch, SignatureError, VersionConflict, WrongRecipient
from ownlm.node.install import STAGES, install, recover, rollback
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.servers import ThreadServer


@pytest.fixture
def node(home, tiny_base):
    settings = load_settings(base=str(tiny_base))
    store = Store(home)
    user = store.create_user("alice")
    yield settings, store, user
    store.close()


def make(store, user, tiny_delta, version, recipient=None, key=None, **kw):
    data, manifest = make_bundle(
        delta_dir=tiny_delta / "delta", report=json.loads((tiny_delta / "report.json").read_text()), user_name=user.name,
        signing_key=key or store.signing_key(user.id), recipient=recipient or store.node_key().public_json(),
        base_name="tiny", version=version, previous=None, created_at=1_790_000_000 + version * 3600, **kw,
    )
    return data, manifest


def state(store, user):
    active = store.active_model(user.id)
    return active["id"] if active else None, [m["version"] for m in store.models(user.id)]


@pytest.mark.parametrize("alg", ["ed25519", "ecdsa-p256"])
def test_signatures(alg):
    key = generate(alg)
    m = sign_manifest({"model": {"id": "pm_x"}, "files": {}}, key)
    from ownlm.artifact.sign import key_id, load_public

    trusted = {key_id(key): load_public(public_pem(key))}
    assert verify_manifest(m, trusted) == key_id(key) and m["signature"]["alg"] == alg
    with pytest.raises(SignatureError, match="invalid"):
        verify_manifest({**m, "model": {"id": "pm_y"}}, trusted)
    with pytest.raises(SignatureError, match="does not trust"):
        verify_manifest(m, {})
    with pytest.raises(SignatureError, match="not signed"):
        verify_manifest({"model": {}}, trusted)
    assert b"signature" not in signed_bytes(m)


def test_model_id_format():
    assert model_id(1_705_759_200) == "pm_2024_01_20_14_00"


def test_round_trip_install_and_show(node, tiny_delta, home):
    settings, store, user = node
    data, manifest = make(store, user, tiny_delta, 1)
    assert data[:5] == b"OWNLM" and len(data) < 20_000
    res = install(store, settings, data)
    assert res.version == 1 and (res.path / "delta.safetensors").is_file()
    assert state(store, user) == (manifest["model"]["id"], [1])
    m = store.active_model(user.id)["manifest"]
    assert m["model"]["base_sha256"] == manifest["model"]["base_sha256"] and m["dataset"]["merkle_root"] == "ab" * 32
    assert m["training"]["heldout_loss_personal"] == 2.9 and m["signature"]["alg"] == "ed25519"
    # no plaintext of the model left outside the models dir, and the bundle is not readable without the key
    assert b"safetensors" not in data and b"base_sha256" not in data


def test_each_fault_is_refused_and_nothing_changes(node, tiny_delta, tmp_path, tiny_base):
    settings, store, user = node
    v1, _ = make(store, user, tiny_delta, 1)
    install(store, settings, v1)
    before = state(store, user)
    v2, _ = make(store, user, tiny_delta, 2)
    other_node = NodeKey.generate().public_json()
    stranger = generate()
    cases = {
        "flipped byte": (lambda: bytes(b ^ (1 if i == len(v2) // 2 else 0) for i, b in enumerate(v2)), CorruptArtifact),
        "flipped header byte": (lambda: v2[:40] + bytes([v2[40] ^ 1]) + v2[41:], (CorruptArtifact, WrongRecipient)),
        "truncated": (lambda: v2[: len(v2) - 7], CorruptArtifact),
        "wrong recipient": (lambda: make(store, user, tiny_delta, 2, recipient=other_node)[0], WrongRecipient),
        "untrusted signer": (lambda: make(store, user, tiny_delta, 2, key=stranger)[0], SignatureError),
        "replayed v1": (lambda: v1, VersionConflict),
    }
    for name, (build, error) in cases.items():
        with pytest.raises(error):
            install(store, settings, build())
        assert state(store, user) == before, name
    # every single-byte flip across the whole bundle is caught (a sample of positions)
    for pos in range(0, len(v2), max(1, len(v2) // 40)):
        bad = bytearray(v2)
        bad[pos] ^= 0x80
        with pytest.raises((CorruptArtifact, WrongRecipient)):
            install(store, settings, bytes(bad))
    assert state(store, user) == before
    assert not [d for d in (settings.home / "models" / user.id).iterdir() if d.name.startswith(".tmp")]


def test_different_base_is_refused(home, tiny_delta, tmp_path, tiny_base):
    import shutil

    other = tmp_path / "other-base"
    shutil.copytree(tiny_base, other)
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes()[:-1] + b"\x07")
    with Store(home) as store:
        user = store.create_user("alice")
        with pytest.raises(DeltaMismatch, match="base"):
            install(store, load_settings(base=str(other)), make(store, user, tiny_delta, 1)[0])
        assert state(store, user) == (None, [])


def test_rollback_and_pruning(node, tiny_delta):
    settings, store, user = node
    ids = [install(store, settings, make(store, user, tiny_delta, v)[0], keep=3).model_id for v in (1, 2, 3, 4)]
    assert state(store, user) == (ids[3], [4, 3, 2])  # v1 pruned
    assert rollback(store, user.id)["id"] == ids[2]
    assert rollback(store, user.id, "2")["id"] == ids[1]
    assert rollback(store, user.id, "base") is None and store.active_model(user.id) is None
    # re-deploying an old bundle needs the explicit flag; then it serves again
    old = make(store, user, tiny_delta, 3)[0]
    with pytest.raises(VersionConflict):
        install(store, settings, old)
    assert install(store, settings, old, rollback=True).model_id == ids[2]
    assert store.active_model(user.id)["id"] == ids[2]


def test_bundle_for_another_user_is_refused_over_http(node, tiny_delta):
    settings, store, user = node
    bob = store.create_user("bob")
    alice_token, bob_token = store.create_token(user.id), store.create_token(bob.id)
    data, manifest = make(store, user, tiny_delta, 1)
    with ThreadServer(create_app(settings, store, None)) as srv:
        r = httpx.post(srv.url + "/api/personalization/deploy", content=data, headers={"Authorization": f"Bearer {bob_token}"})
        assert r.status_code == 401 and "alice" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/api/personalization/deploy", content=data[:-3], headers={"Authorization": f"Bearer {alice_token}"})
        assert r.status_code == 422
        r = httpx.post(srv.url + "/api/personalization/deploy", content=data, headers={"Authorization": f"Bearer {alice_token}"})
        assert r.status_code == 200 and r.json()["model_id"] == manifest["model"]["id"]
        listed = httpx.get(srv.url + "/api/personalization/models", headers={"Authorization": f"Bearer {alice_token}"}).json()
        assert listed["active"] == manifest["model"]["id"] and listed["models"][0]["signature_verified"]
        assert httpx.get(srv.url + "/api/personalization/models", headers={"Authorization": f"Bearer {bob_token}"}).json()["models"] == []
        r = httpx.post(srv.url + "/api/personalization/rollback", json={"target": "base"}, headers={"Authorization": f"Bearer {alice_token}"})
        assert r.json() == {"active": None}


@pytest.mark.parametrize("stage", STAGES)
def test_kill9_mid_install_leaves_old_or_new_complete(node, tiny_delta, home, tmp_path, stage):
    settings, store, user = node
    v1, m1 = make(store, user, tiny_delta, 1)
    install(store, settings, v1)
    v2, m2 = make(store, user, tiny_delta, 2)
    bundle = tmp_path / "v2.ownlm"
    bundle.write_bytes(v2)
    env = {**os.environ, "OWNLM_HOME": str(home), "OWNLM_BASE": str(settings.base), "OWNLM_FAULT_PAUSE": stage}
    proc = subprocess.Popen([sys.executable, "-m", "ownlm", "deploy", str(bundle)], env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the install reaches the failpoint
    assert f"paused at {stage}" in line
    proc.kill()
    proc.wait()
    store.close()
    with Store(home) as s:
        recover(s, settings)
        active = s.active_model(user.id)
        assert active["id"] in (m1["model"]["id"], m2["model"]["id"])
        expect_new = stage == "routed"
        assert active["id"] == (m2 if expect_new else m1)["model"]["id"]
        from ownlm.bitdelta.format import load_delta

        load_delta(active["path"])  # complete and intact
        # leftovers are cleaned, and the same bundle installs now (or is already there)
        dirs = sorted(d.name for d in (home / "models" / user.id).iterdir())
        assert all(not d.startswith(".tmp") for d in dirs)
        if not expect_new:
            install(s, settings, v2)
        assert s.active_model(user.id)["id"] == m2["model"]["id"]


def test_cli_round_trip_trainer_to_node(tmp_path, tiny_base, tiny_delta):
    from tests.conftest import run_cli

    trainer, node_home = tmp_path / "trainer", tmp_path / "node"
    env_t = {"OWNLM_HOME": str(trainer), "OWNLM_BASE": str(tiny_base), "OWNLM_USER": "alice"}
    env_n = {"OWNLM_HOME": str(node_home), "OWNLM_BASE": str(tiny_base), "OWNLM_USER": "alice"}
    assert run_cli("token", "create", "alice", env=env_n).returncode == 0
    pub = tmp_path / "node.pub.json"
    assert run_cli("node", "pubkey", "--out", str(pub), env=env_n).returncode == 0
    signer = run_cli("keys", "public", env=env_t)
    (tmp_path / "alice.pem").write_text(signer.stdout)
    bundle = tmp_path / "m.ownlm"
    r = run_cli("bundle", str(tiny_delta / "delta"), "--report", str(tiny_delta / "report.json"), "--to", str(pub),
                "--out", str(bundle), env=env_t)
    assert r.returncode == 0, r.stderr
    r = run_cli("deploy", str(bundle), env=env_n)
    assert r.returncode == 1 and "does not trust" in r.stderr  # the node must be told to trust the trainer
    assert run_cli("trust", "add", str(tmp_path / "alice.pem"), "--label", "alice's laptop", env=env_n).returncode == 0
    r = run_cli("deploy", str(bundle), env=env_n)
    assert r.returncode == 0, r.stderr
    listing = run_cli("models", env=env_n).stdout
    assert "verified" in listing and "●" in listing
    shown = run_cli("models", "show", "1", env=env_n).stdout
    assert "merkle_root" in shown and "base_sha256" in shown and "signature: verified" in shown
    r = run_cli("deploy", str(bundle), env=env_n)
    assert r.returncode == 1 and "not newer" in r.stderr
