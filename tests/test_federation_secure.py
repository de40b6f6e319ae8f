"""Tier-3 federated rounds (privacy/securefed.py): devices encrypt their updates to the person's CKKS key, the
server (a third home that never holds the key) only adds ciphertexts, each device decrypts the sum and installs the
same model. A real Flower deployment on 127.0.0.1 with the tiny model; the key's hand-over between devices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ownlm.artifact import sign
from ownlm.capture.importers import parse_file
from ownlm.capture.importers.base import ImportResult
from ownlm.errors import ConfigError, CorruptArtifact, SignatureError, UpdateRefused, WrongRecipient
from ownlm.evaluate.personas.fixtures import DATA_DIR
from ownlm.privacy import fedupdate as fu
from ownlm.privacy import secure_agg as sa
from ownlm.privacy import securefed as sf
from ownlm.privacy import tiers
from ownlm.settings import load_settings
from ownlm.store import Store
from ownlm.store.imports import import_into
from tests.servers import free_port

pytest.importorskip("tenseal")
USER = "me"


@pytest.fixture
def homes(tmp_path, tiny_base, monkeypatch):
    """laptop and phone (the person's devices, tier 3, each with half of mira's conversations) and relay (the
    aggregating server: it knows the user and trusts both devices' signing keys, and has no conversations)."""
    monkeypatch.setenv("OWNLM_BASE", str(tiny_base))
    monkeypatch.setenv("OWNLM_DEVICE", "cpu")
    history = parse_file(DATA_DIR / "mira.jsonl")
    out, pems = {}, {}
    for i, name in enumerate(("laptop", "phone", "relay")):
        out[name] = tmp_path / name
        with Store(out[name]) as store:
            user = store.create_user(USER)
            if name != "relay":
                import_into(store, user.id, ImportResult(history.format, history.conversations[i:60:2]), f"{name}.jsonl")
                tiers.set_tier(store, user, 3, confirm=True)
            pems[name] = sign.public_pem(store.signing_key(user.id))
    for name, home in out.items():
        with Store(home) as store:
            for other in ("laptop", "phone"):
                if other != name:
                    store.trust(pems[other], f"{other} device", user_id=store.get_user(USER).id)
    return out


def _hand_over_key(homes) -> str:
    """The pair made on the laptop, sealed to the phone's node key, imported there."""
    with Store(homes["laptop"]) as lap, Store(homes["phone"]) as phone:
        kid = sf.init_keys(lap, lap.get_user(USER)).key_id
        data = sf.export_keys(lap, lap.get_user(USER), phone.node_key().public_json())
        assert sf.import_keys(phone, phone.get_user(USER), data) == kid
        assert sf.import_keys(phone, phone.get_user(USER), data) == kid  # again: nothing changes
    return kid


def test_the_key_goes_only_to_a_trusted_device_it_was_sealed_to(homes):
    with Store(homes["laptop"]) as lap, Store(homes["phone"]) as phone, Store(homes["relay"]) as relay:
        luser, puser, ruser = lap.get_user(USER), phone.get_user(USER), relay.get_user(USER)
        with pytest.raises(ConfigError, match="no tier-3"):  # nothing to export before init
            sf.export_keys(lap, luser, phone.node_key().public_json())
        sf.init_keys(lap, luser)
        to_phone = sf.export_keys(lap, luser, phone.node_key().public_json())
        with pytest.raises(WrongRecipient):  # sealed to the phone: the relay cannot open it
            sf.import_keys(relay, ruser, to_phone)
        damaged = bytearray(to_phone)
        damaged[-40] ^= 1
        with pytest.raises(CorruptArtifact):
            sf.import_keys(phone, puser, bytes(damaged))
        # a key file signed by a key the phone does not trust for the user
        stranger_home = homes["relay"].parent / "stranger"
        with Store(stranger_home) as stranger:
            suser = stranger.create_user(USER)
            sf.init_keys(stranger, suser)
            forged = sf.export_keys(stranger, suser, phone.node_key().public_json())
        with pytest.raises(SignatureError):
            sf.import_keys(phone, puser, forged)
        assert phone.he_keys(puser.id) is None and relay.he_keys(ruser.id) is None
        kid = sf.import_keys(phone, puser, to_phone)
        assert sa.context_id(phone.he_keys(puser.id)[1]) == kid == sf.device_keys(lap, luser).key_id
        with pytest.raises(ConfigError, match="another tier-3 key"):  # never silently replaced
            with Store(stranger_home) as stranger:
                other = sf.export_keys(stranger, stranger.get_user(USER), lap.node_key().public_json())
            lap.trust(sign.public_pem(Store(stranger_home).signing_key(suser.id)), "stranger", user_id=luser.id)
            sf.import_keys(lap, luser, other)
        actions = [a["action"] for a in lap.audit_log(luser.id)] + [a["action"] for a in phone.audit_log(puser.id)]
        assert "he_key_exported" in actions and "he_key_imported" in actions


def test_a_device_without_the_key_refuses_a_secure_round_before_training(homes):
    with Store(homes["phone"]) as store:
        user = store.get_user(USER)
        spec = fu.RoundSpec(round_id=fu.new_round_id(), user=USER, base_sha256="00" * 32, max_steps=1, secure=True)
        with pytest.raises(ConfigError, match="no tier-3"):
            fu.make_update(store, load_settings(home=str(homes["phone"])), user, spec, homes["phone"] / "work",
                           destination="203.0.113.7:9091")
        plain = fu.RoundSpec(round_id=fu.new_round_id(), user=USER, base_sha256="00" * 32, max_steps=1)
        with pytest.raises(Exception, match="tier 3"):  # a plaintext round: refused at tier 3 wherever the server is
            fu.make_update(store, load_settings(home=str(homes["phone"])), user, plain, homes["phone"] / "work",
                           destination="127.0.0.1:9091")
        assert "federated_update_sent" not in [a["action"] for a in store.audit_log(user.id)]
        assert not (homes["phone"] / "work").exists()


def test_the_server_refuses_plaintext_and_foreign_keys_in_a_secure_round(homes):
    from ownlm.basemodel import base_sha256, resolve_base

    _hand_over_key(homes)
    s_phone = load_settings(home=str(homes["phone"]))
    sha = base_sha256(resolve_base(s_phone.base), s_phone.home)
    with Store(homes["phone"]) as phone, Store(homes["relay"]) as relay:
        user, ruser = phone.get_user(USER), relay.get_user(USER)
        spec = fu.RoundSpec(round_id=fu.new_round_id(), user=USER, base_sha256=sha, max_steps=1, secure=True)
        state = fu.start_round(relay, ruser, spec, devices=1)
        up, _ = fu.make_update(phone, s_phone, user, spec, homes["phone"] / "work", destination="203.0.113.7:9091")
        assert isinstance(up.payload, bytes) and up.payload.startswith(sa.MAGIC) and up.header["form"] == "ckks"
        assert "heldout_loss_base" not in up.header["figures"]  # counts only at tier 3
        foreign = sa.new_keys()
        with pytest.raises(UpdateRefused, match="public context"):
            fu.verify_update(relay, ruser, state, up.header, up.payload, public_context=foreign.public)
        with pytest.raises(UpdateRefused, match="public context"):
            fu.verify_update(relay, ruser, state, up.header, up.payload, public_context=sa.new_keys().secret)
        with pytest.raises(UpdateRefused, match="plaintext round|ckks update"):  # float vector in a secure round
            fu.verify_update(relay, ruser, state, up.header, np.zeros(up.header["dim"], np.float32))
        reencrypted = sa.encrypt(foreign.public, np.zeros(up.header["dim"], np.float32))
        with pytest.raises(UpdateRefused, match="tampered"):
            fu.verify_update(relay, ruser, state, up.header, reencrypted, public_context=foreign.public)
        assert fu.verify_update(relay, ruser, state, up.header, up.payload, public_context=up.public_context)
        refusals = [a for a in relay.audit_log(ruser.id) if a["action"] == fu.REFUSED]
        assert len(refusals) == 4


def test_a_real_tier3_flower_round_where_the_server_only_adds_ciphertexts(homes):
    from ownlm.privacy import federation as fed

    pytest.importorskip("flwr")
    kid = _hand_over_key(homes)
    link_port = free_port()
    superlink = f"127.0.0.1:{link_port}"
    procs = [fed.start_superlink(homes["relay"], port=link_port)]  # plain HTTP (--insecure): test_federation.py runs TLS
    try:
        fed.wait_port("127.0.0.1", link_port, timeout=30)
        for name in ("laptop", "phone"):
            procs.append(fed.start_supernode(homes[name], superlink, USER, port=free_port(), gate=False))
        round_id = fu.new_round_id()
        result = fed.run_round(homes["relay"], superlink, {
            **fed.RUN_CONFIG, "home": str(homes["relay"]), "user": USER, "round": round_id, "devices": 2,
            "max_steps": 2, "method": "latent", "wait_s": 60.0, "timeout_s": 180.0, "keep_received": True,
            "secure": True}, timeout_s=240)
    finally:
        for p in reversed(procs):
            p.stop()
    assert result["state"] == "installed", (result, procs[0].log_tail())
    assert result["secure"] is True and result["key_id"] == kid and not result["refused"]
    manifests = {}
    for name in ("laptop", "phone"):
        with Store(homes[name]) as store:
            active = store.active_model(store.get_user(USER).id)
            m = active["manifest"] if isinstance(active["manifest"], dict) else json.loads(active["manifest"])
            manifests[name] = m
            assert active["id"] == result["model"] and m["federation"]["secure"] is True
            assert "dp" not in m["training"]  # tier 3, no DP asked: the relay only ever sees ciphertexts
    # the same weights on both devices: each decrypted the same sum with the same key (tensors compared, not file
    # bytes: safetensors writes its metadata map in a per-process order)
    from safetensors.numpy import load_file

    from ownlm.bitdelta.format import TENSORS

    loaded = [load_file(str(next((homes[n] / "models").glob(f"*/{result['model']}")) / TENSORS)) for n in ("laptop", "phone")]
    assert loaded[0].keys() == loaded[1].keys() and all(np.array_equal(loaded[0][k], loaded[1][k]) for k in loaded[0])

    # what the server saw and kept: headers, CKKS ciphertexts and the public context, never a float update or a key
    with Store(homes["relay"]) as relay:
        assert relay.he_keys(relay.get_user(USER).id) is None
    received = sorted((fed.round_dir(homes["relay"], round_id) / "received").iterdir())
    assert {p.name.split(".", 1)[1] for p in received} == {"header.json", "payload.ckks", "public.ctx"}
    with Store(homes["laptop"]) as lap:
        secret = lap.he_keys(lap.get_user(USER).id)[0]
    for p in received:
        if p.name.endswith(".payload.ckks"):
            assert sa.read_header(p.read_bytes())["context"] == kid
            head = json.loads((p.parent / p.name.replace("payload.ckks", "header.json")).read_text())
            vec = sa.decrypt(secret, p.read_bytes(), head["dim"])  # only the person's key opens it
            assert np.isfinite(vec).all() and np.abs(vec).max() > 0
            assert "loss" not in head["figures"]
        if p.name.endswith(".public.ctx"):
            sa.public_context(p.read_bytes())  # refuses a context that carries the secret key


def test_the_cli_hands_the_key_from_one_device_to_another(homes):
    from tests.conftest import run_cli

    def cli(name, *args):
        return run_cli(*args, env={"OWNLM_HOME": str(homes[name])})

    r = cli("laptop", "federate", "key", "init", "--user", USER)
    assert r.returncode == 0, r.stderr
    kid = json.loads(r.stdout)["key_id"]
    node = homes["phone"].parent / "phone-node.json"
    assert cli("phone", "node", "pubkey", "--out", str(node)).returncode == 0
    keyfile = homes["phone"].parent / "me.hekey"
    r = cli("laptop", "federate", "key", "export", "--user", USER, "--to", str(node), "--out", str(keyfile))
    assert r.returncode == 0, r.stderr
    r = cli("relay", "federate", "key", "import", "--user", USER, str(keyfile))  # not sealed to the relay
    assert r.returncode == 1 and "sealed to node key" in r.stderr, r.stderr
    r = cli("phone", "federate", "key", "import", "--user", USER, str(keyfile))
    assert r.returncode == 0 and json.loads(r.stdout)["key_id"] == kid, r.stderr
