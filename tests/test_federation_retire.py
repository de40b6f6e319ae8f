"""The right to delete across a person's devices (privacy/fedretire.py): a federated round's aggregate is installed
on the laptop and the phone (each trained one real step on its own half of mira's conversations, tiny random
Llama, real SQLCipher stores); deleting a conversation on the phone removes the phone's copy and writes a signed
retire notice; `ownlm federate retire` on the laptop removes the laptop's copy. Forged, foreign and malformed
notices are refused and change nothing."""

from __future__ import annotations

import json

import pytest

from ownlm.artifact import sign
from ownlm.errors import CorruptArtifact, InvalidInput, SignatureError
from ownlm.privacy import fedretire as fr
from ownlm.privacy import fedupdate as fu
from ownlm.privacy.aggregate import PlainSum, finish
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.conftest import run_cli
from tests.test_federation import USER, devices  # noqa: F401 (fixture)


@pytest.fixture
def federated(devices):  # noqa: F811
    """One round of both devices (1 step each), its aggregate installed on both; returns (devices, round id, model id)."""
    from ownlm.basemodel import base_sha256, resolve_base

    settings = {n: load_settings(home=str(h)) for n, h in devices.items()}
    sha = base_sha256(resolve_base(settings["laptop"].base), settings["laptop"].home)
    spec = fu.RoundSpec(round_id=fu.new_round_id(), user=USER, base_sha256=sha, max_steps=1, method="factors")
    with Store(devices["laptop"]) as lap, Store(devices["phone"]) as phone:
        stores = {"laptop": lap, "phone": phone}
        state = fu.start_round(lap, lap.get_user(USER), spec, devices=2)
        total = None
        for name, store in stores.items():
            up, _ = fu.make_update(store, settings[name], store.get_user(USER), spec, devices[name] / "work",
                                   destination="127.0.0.1:9091")
            fu.verify_update(lap, lap.get_user(USER), state, up.header, up.payload)
            total = total or PlainSum(up.payload.shape[0])
            total.add(up.payload, up.header["weight"])
        bundles, figures = fu.aggregate_bundles(lap, settings["laptop"], lap.get_user(USER), state,
                                                finish(*total.total()), devices["laptop"] / "fedwork", "tiny")
        for name, store in stores.items():
            device = store.node_key().public_json()["key_id"]
            fu.install_aggregate(store, settings[name], store.get_user(USER), bundles[device], spec.round_id, gate=False)
            assert store.active_model(store.get_user(USER).id)["id"] == figures["model"]
    return devices, spec.round_id, figures["model"]


def _model_dirs(home) -> list[str]:
    root = home / "models"
    return sorted(p.name for p in root.glob("*/*")) if root.exists() else []


def test_a_delete_on_one_device_retires_the_aggregate_on_the_other(federated, tmp_path):
    devices, round_id, model = federated
    env = {n: {"OWNLM_HOME": str(h)} for n, h in devices.items()}
    with Store(devices["phone"]) as phone:
        cid = phone.query("SELECT id FROM conversations WHERE user_id = ? LIMIT 1", (phone.get_user(USER).id,))[0][0]
    r = run_cli("delete", "--conversation", cid, "--yes", "--user", USER, env=env["phone"])
    assert r.returncode == 0, r.stderr
    assert f"removed the models trained on them: {model}" in r.stdout and "retire notice" in r.stdout, r.stdout
    notices = sorted(fr.notice_dir(load_settings(home=str(devices["phone"]))).iterdir())
    assert len(notices) == 1
    notice = json.loads(notices[0].read_text())
    assert notice["rounds"] == [round_id] and notice["user"] == USER
    assert not any(w in notices[0].read_text() for w in ("content", "messages", cid))  # ids of rounds, no data
    with Store(devices["phone"]) as phone:
        assert phone.active_model(phone.get_user(USER).id) is None and _model_dirs(devices["phone"]) == []

    laptop_models = _model_dirs(devices["laptop"])
    assert len(laptop_models) == 1
    with Store(devices["laptop"]) as lap:
        user = lap.get_user(USER)
        # refused, nothing changed: signed by a key the laptop does not trust, another person's, not a notice
        unsigned = {k: v for k, v in notice.items() if k != "signature"}
        with pytest.raises(SignatureError):
            fr.apply_notice(lap, user, json.dumps(sign.sign_manifest(unsigned, sign.generate())).encode())
        with pytest.raises(SignatureError):  # a signed field changed after signing
            fr.apply_notice(lap, user, json.dumps({**notice, "rounds": [round_id, "fr_other"]}).encode())
        other = lap.create_user("someone-else")
        with pytest.raises(InvalidInput, match="not 'someone-else'"):
            fr.apply_notice(lap, other, notices[0].read_bytes())
        for junk in (b"", b"not json", b"[]", json.dumps({**notice, "rounds": []}).encode()):
            with pytest.raises(CorruptArtifact):
                fr.apply_notice(lap, user, junk)
        assert lap.active_model(user.id)["id"] == model and _model_dirs(devices["laptop"]) == laptop_models

    r = run_cli("federate", "retire", str(notices[0]), "--user", USER, env=env["laptop"])
    assert r.returncode == 0, r.stderr
    assert f"removed {model}" in r.stdout and "now serving the base model" in r.stdout, r.stdout
    r = run_cli("federate", "retire", str(notices[0]), "--user", USER, env=env["laptop"])  # again: nothing to do
    assert r.returncode == 0 and "this device did not hold them" in r.stdout, r.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = run_cli("federate", "retire", str(bad), "--user", USER, env=env["laptop"])
    assert r.returncode != 0 and "not JSON" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with Store(devices["laptop"]) as lap:
        user = lap.get_user(USER)
        assert lap.active_model(user.id) is None and _model_dirs(devices["laptop"]) == []
        retired = [a for a in lap.audit_log(user.id, limit=200) if a["action"] == "federation_retired"]
        assert [a["detail"]["models"] for a in retired] == [[], [model]]  # newest first
        assert len(_conversations(lap)) == 30  # the laptop's own conversations are untouched


def _conversations(store) -> list:
    return store.query("SELECT id FROM conversations WHERE user_id = ?", (store.get_user(USER).id,))


def test_the_notice_is_written_over_http_and_after_a_crash(federated):
    """DELETE /data answers with the notice it wrote; a delete whose process died right after its COMMIT (the
    models gone, no notice yet: here delete_data alone) gets its notice when `ownlm serve` next starts, once."""
    import httpx

    from tests.servers import ProcessServer

    devices, round_id, model = federated
    lap_settings = load_settings(home=str(devices["laptop"]))
    with Store(devices["laptop"]) as lap:
        user = lap.get_user(USER)
        assert lap.delete_data(user.id, conversation_id=_conversations(lap)[0][0])["federation_rounds"] == [round_id]
    assert not fr.notice_dir(lap_settings).exists()
    srv = ProcessServer(devices["laptop"], "--no-model").start()
    srv.stop()
    notices = sorted(fr.notice_dir(lap_settings).iterdir())
    assert len(notices) == 1 and json.loads(notices[0].read_text())["rounds"] == [round_id]
    with Store(devices["laptop"]) as lap:
        assert fr.finish_interrupted(lap, lap_settings, lap.get_user(USER)) is None  # written once, not at every start
        assert fr.pending_notices(lap, lap_settings, lap.get_user(USER)) == [notices[0].read_text()]

    with Store(devices["phone"]) as phone:
        user = phone.get_user(USER)
        token, cid = phone.create_token(user.id), _conversations(phone)[0][0]
    srv = ProcessServer(devices["phone"], "--no-model").start()
    try:
        r = httpx.delete(srv.url + "/api/personalization/data", params={"conversation_id": cid},
                         headers={"Authorization": f"Bearer {token}"}, timeout=60)
    finally:
        srv.stop()
    assert r.status_code == 200, r.text
    deleted = r.json()["deleted"]
    assert deleted["models_removed"] == [model] and deleted["federation_rounds"] == [round_id]
    path = deleted["federation_retire_notice"]
    assert json.loads(open(path).read())["rounds"] == [round_id]
    assert [p.name for p in fr.notice_dir(load_settings(home=str(devices["phone"]))).iterdir()] == [path.rsplit("/", 1)[1]]


def test_keep_models_writes_no_notice(federated):
    devices, _, model = federated
    with Store(devices["phone"]) as phone:
        user = phone.get_user(USER)
        cid = _conversations(phone)[0][0]
        res = phone.delete_data(user.id, conversation_id=cid, keep_models=True)
        assert res["federation_rounds"] == [] and res["models_kept"] == [model]
        assert fr.after_delete(phone, load_settings(home=str(devices["phone"])), user, res) is None


def test_the_next_real_flower_round_carries_the_notice_to_the_other_device(federated, tmp_path):
    """The laptop deletes a conversation; nobody copies the notice. The next federated round (real Flower processes,
    TLS, the laptop as server and device) carries it: the phone removes its copy of the old aggregate before it
    installs the new one."""
    from ownlm.privacy import federation as fed
    from ownlm.privacy.fedtls import server_tls
    from tests.servers import free_port

    pytest.importorskip("flwr")
    devices, old_round, old_model = federated
    with Store(devices["laptop"]) as lap:
        user = lap.get_user(USER)
        res = lap.delete_data(user.id, conversation_id=_conversations(lap)[0][0])
        assert res["federation_rounds"] == [old_round]
        assert fr.after_delete(lap, load_settings(home=str(devices["laptop"])), user, res) is not None
    with Store(devices["phone"]) as phone:
        assert phone.active_model(phone.get_user(USER).id)["id"] == old_model  # until the round reaches it
    link_port = free_port()
    tls = server_tls(devices["laptop"], [])
    procs = [fed.start_superlink(devices["laptop"], port=link_port, tls=tls)]
    try:
        fed.wait_port("127.0.0.1", link_port, timeout=30)
        for name in ("laptop", "phone"):
            procs.append(fed.start_supernode(devices[name], f"127.0.0.1:{link_port}", USER, port=free_port(), gate=False,
                                             ca=tls.ca))
        result = fed.run_round(devices["laptop"], f"127.0.0.1:{link_port}", {
            **fed.RUN_CONFIG, "home": str(devices["laptop"]), "user": USER, "round": fu.new_round_id(), "devices": 2,
            "max_steps": 1, "method": "factors", "wait_s": 60.0, "timeout_s": 120.0}, timeout_s=150, ca=tls.ca)
    finally:
        for p in reversed(procs):
            p.stop()
    assert result["state"] == "installed", (result, procs[0].log_tail())
    retired = [r for v in result["installed"].values() for r in v["retired"]]
    assert retired == [{"rounds": [old_round], "models_removed": [old_model]}]  # the phone's copy, nobody else's
    with Store(devices["phone"]) as phone:
        user = phone.get_user(USER)
        assert phone.active_model(user.id)["id"] == result["model"]
        with phone.tx() as db:
            assert phone.models_of_rounds(db, user.id, [old_round]) == []
        assert [a["detail"]["models"] for a in phone.audit_log(user.id, limit=300)
                if a["action"] == "federation_retired"] == [[old_model]]
