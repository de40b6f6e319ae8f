"""Federated rounds across a person's devices (privacy/federation.py, privacy/fedupdate.py): a real Flower
deployment (SuperLink, two SuperNodes, `flwr run`) on 127.0.0.1 with the tiny model; update integrity; tiers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ownlm.artifact import sign
from ownlm.capture.importers import parse_file
from ownlm.capture.importers.base import ImportResult
from ownlm.errors import InvalidInput, PrivacyViolation, UpdateRefused
from ownlm.evaluate.personas.fixtures import DATA_DIR
from ownlm.privacy import fedupdate as fu
from ownlm.privacy import tiers
from ownlm.privacy.fedtls import server_tls
from ownlm.settings import load_settings
from ownlm.store import Store
from ownlm.store.imports import import_into
from tests.servers import free_port

USER = "me"


@pytest.fixture
def devices(tmp_path, tiny_base, monkeypatch):
    """Two ownlm homes of one person (laptop: also the federation server; phone), each with its own half of
    mira's conversations, each trusting the other's signing key for the user."""
    monkeypatch.setenv("OWNLM_BASE", str(tiny_base))
    monkeypatch.setenv("OWNLM_DEVICE", "cpu")
    history = parse_file(DATA_DIR / "mira.jsonl")
    homes, pems = {}, {}
    for i, name in enumerate(("laptop", "phone")):
        home = tmp_path / name
        with Store(home) as store:
            user = store.create_user(USER)
            import_into(store, user.id, ImportResult(history.format, history.conversations[i:60:2]), f"{name}.jsonl")
            pems[name] = sign.public_pem(store.signing_key(user.id))
        homes[name] = home
    for name, home in homes.items():
        with Store(home) as store:
            for other, pem in pems.items():
                if other != name:
                    store.trust(pem, f"{other} device", user_id=store.get_user(USER).id)
    return homes


def _texts(home: Path) -> list[str]:
    with Store(home) as store:
        user = store.get_user(USER)
        conversations, _ = store.training_view(user.id)
    return [m["content"] for rows in conversations.values() for m in rows]


def _check_tls(port: int, ca, tmp_path) -> None:
    """The SuperLink speaks TLS with a certificate for 127.0.0.1 from the home's CA, and a client holding another
    CA refuses it."""
    import socket
    import ssl

    from ownlm.privacy.fedtls import server_tls as other_ca

    good = ssl.create_default_context(cafile=str(ca))
    good.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, good.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
    stranger = ssl.create_default_context(cafile=str(other_ca(tmp_path / "stranger", []).ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            stranger.wrap_socket(raw, server_hostname="127.0.0.1")


def test_a_real_flower_round_installs_the_aggregate_on_both_devices(devices, tiny_base, tmp_path):
    from ownlm.basemodel import load_base
    from ownlm.engine.personal import PersonalEngine
    from ownlm.privacy import federation as fed

    pytest.importorskip("flwr")
    link_port = free_port()
    superlink = f"127.0.0.1:{link_port}"
    tls = server_tls(devices["laptop"], [])  # TLS, as `ownlm federate server` runs it: the devices verify its CA
    procs = [fed.start_superlink(devices["laptop"], port=link_port, tls=tls)]
    try:
        fed.wait_port("127.0.0.1", link_port, timeout=30)
        _check_tls(link_port, tls.ca, tmp_path)
        for name in ("laptop", "phone"):  # the tiny random model cannot pass the gate: judged elsewhere (gate=False)
            procs.append(fed.start_supernode(devices[name], superlink, USER, port=free_port(), gate=False, ca=tls.ca))
        round_id = fu.new_round_id()
        result = fed.run_round(devices["laptop"], superlink, {
            **fed.RUN_CONFIG, "home": str(devices["laptop"]), "user": USER, "round": round_id, "devices": 2,
            "max_steps": 2, "method": "factors", "wait_s": 60.0, "timeout_s": 120.0, "keep_received": True,
            "dp_epsilon": 8.0,  # the server asks for DP-SGD updates (tier-1 devices would not use it unasked)
        }, timeout_s=150, ca=tls.ca)
    finally:
        for p in reversed(procs):
            p.stop()
    assert result["state"] == "installed", (result, procs[0].log_tail())
    assert len(result["devices"]) == 2 and not result["refused"] and not result["failed"]
    models = {v["model"] for v in result["installed"].values()}
    assert models == {result["model"]}  # the same model on every device

    settings = {n: load_settings(home=str(h)) for n, h in devices.items()}
    base = load_base(settings["laptop"])
    for name, home in devices.items():
        with Store(home) as store:
            user = store.get_user(USER)
            active = store.active_model(user.id)
            assert active["id"] == result["model"]
            manifest = active["manifest"] if isinstance(active["manifest"], dict) else json.loads(active["manifest"])
            assert manifest["federation"]["round"] == round_id and manifest["bitdelta"]["mode"] == "lora1"
            dp = manifest["training"]["dp"]  # every update was trained with DP-SGD; the aggregate says how much
            assert 0 < dp["epsilon"] <= 8.0 and set(dp["devices"]) == set(manifest["federation"]["devices"])
            engine = PersonalEngine(base, store)
            engine.refresh()
            assert engine.model_for(user.id) == (user.id, result["model"])  # served by the store's routing
            actions = [a["action"] for a in store.audit_log(user.id, limit=200)]
            assert "federated_update_sent" in actions and "federated_model_received" in actions
    with Store(devices["laptop"]) as store:
        actions = [a["action"] for a in store.audit_log(store.get_user(USER).id, limit=200)]
        assert fu.STARTED in actions and fu.FINISHED in actions

    # What the server received: a signed header with these fields and a float vector; no conversation text.
    received = fed.round_dir(devices["laptop"], round_id) / "received"
    blobs = sorted(received.iterdir())
    assert len(blobs) == 4
    for p in blobs:
        if p.name.endswith(".header.json"):
            assert set(json.loads(p.read_text())) == {
                "kind", "version", "user", "round", "device", "node_pubkey", "base_sha256", "method", "r", "alpha",
                "layout", "layout_sha256", "dim", "weight", "form", "key_id", "payload_sha256", "merkle_root", "max_version",
                "previous", "figures", "dp", "signature"}
    raw = b"".join(p.read_bytes() for p in blobs)
    texts = _texts(devices["laptop"]) + _texts(devices["phone"])
    assert len(texts) > 40
    for t in texts:
        assert t[:24].encode() not in raw


@pytest.fixture
def one_round(devices):
    """The laptop's store as the server, an update made (really trained, 1 step) by the phone for its round."""
    lap, phone = Store(devices["laptop"]), Store(devices["phone"])
    s_lap, s_phone = load_settings(home=str(devices["laptop"])), load_settings(home=str(devices["phone"]))
    from ownlm.basemodel import base_sha256, resolve_base

    sha = base_sha256(resolve_base(s_lap.base), s_lap.home)
    spec = fu.RoundSpec(round_id=fu.new_round_id(), user=USER, base_sha256=sha, max_steps=1, dp_epsilon=8.0)
    state = fu.start_round(lap, lap.get_user(USER), spec, devices=1)
    update, _ = fu.make_update(phone, s_phone, phone.get_user(USER), spec, devices["phone"] / "work",
                               destination="127.0.0.1:9091")
    yield {"lap": lap, "phone": phone, "s_lap": s_lap, "s_phone": s_phone, "spec": spec, "state": state,
           "update": update, "sha": sha}
    lap.close()
    phone.close()


def _refusals(store: Store) -> list[str]:
    return [a["detail"]["reason"] for a in store.audit_log(store.get_user(USER).id, limit=200) if a["action"] == fu.REFUSED]


def test_tampered_replayed_and_wrong_round_updates_are_refused_and_audited(one_round):
    r = one_round
    lap, user, state, up = r["lap"], r["lap"].get_user(USER), r["state"], r["update"]
    unsigned = {k: v for k, v in up.header.items() if k != "signature"}
    phone_key = r["phone"].signing_key(r["phone"].get_user(USER).id)

    def refused(header, payload, match, st=state):
        with pytest.raises(UpdateRefused, match=match):
            fu.verify_update(lap, user, st, header, payload)

    bad = up.payload.copy()
    bad[0] += 1.0
    refused(up.header, bad, "tampered")  # one float changed after signing
    refused({**up.header, "weight": up.header["weight"] * 10}, up.payload, "signature")  # a signed field changed
    refused(sign.sign_manifest(unsigned, sign.generate()), up.payload, "signature")  # a key the server does not trust
    refused(sign.sign_manifest({**unsigned, "round": "fr_20990101_000000_deadbeef"}, phone_key), up.payload, "wrong round")
    refused(sign.sign_manifest({**unsigned, "base_sha256": "00" * 32}, phone_key), up.payload, "wrong base")
    refused(sign.sign_manifest({**unsigned, "dp": None}, phone_key), up.payload, "the round asks for DP-SGD")
    over = {**unsigned["dp"], "epsilon": r["spec"].dp_epsilon * 2}
    refused(sign.sign_manifest({**unsigned, "dp": over}, phone_key), up.payload, "within the round's budget")

    assert fu.verify_update(lap, user, state, up.header, up.payload)["device"] in state.accepted
    refused(up.header, up.payload, "replayed: this device already sent")  # twice in one round

    spec2 = fu.RoundSpec(round_id=fu.new_round_id(), user=USER, base_sha256=r["sha"], max_steps=1)
    state2 = fu.start_round(lap, user, spec2, devices=1)
    refused(up.header, up.payload, "replayed: the update was made for the earlier round", st=state2)
    with pytest.raises(UpdateRefused, match="already run"):
        fu.start_round(lap, user, r["spec"], devices=1)

    reasons = _refusals(lap)
    assert len(reasons) == 9
    for word in ("tampered", "signature", "wrong round", "wrong base", "already sent", "earlier round",
                 "differential privacy"):
        assert any(word in x for x in reasons), (word, reasons)


def test_the_aggregate_installs_only_for_the_round_the_device_took_part_in(one_round):
    from ownlm.privacy.aggregate import PlainSum, finish

    r = one_round
    lap, phone, user, state, up = r["lap"], r["phone"], r["lap"].get_user(USER), r["state"], r["update"]
    fu.verify_update(lap, user, state, up.header, up.payload)
    s = PlainSum(up.payload.shape[0])
    s.add(up.payload, up.header["weight"])
    mean = finish(*s.total())
    bundles, figures = fu.aggregate_bundles(lap, r["s_lap"], user, state, mean, r["s_lap"].home / "fedwork", "tiny")
    assert set(bundles) == {up.header["device"]} and figures["version"] == 1
    puser = phone.get_user(USER)
    with pytest.raises(UpdateRefused, match="not the aggregate of round"):
        fu.install_aggregate(phone, r["s_phone"], puser, bundles[up.header["device"]], "fr_other", gate=False)
    res = fu.install_aggregate(phone, r["s_phone"], puser, bundles[up.header["device"]], r["spec"].round_id, gate=False)
    assert phone.active_model(puser.id)["id"] == res.model_id == figures["model"]
    # the aggregate of one device with one update is that device's own adapter, re-quantized: same signs
    from ownlm.bitdelta import load_delta

    delta = load_delta(res.path)
    assert delta.mode == "lora1" and delta.lora_r == fu.RoundSpec.r


def test_tiers_decide_where_an_update_may_go(devices):
    tiers.check_may_send_update(0, "203.0.113.7:9091")
    tiers.check_may_send_update(1, "127.0.0.1:9091")
    tiers.check_may_send_update(1, "192.168.1.20:9091")
    tiers.check_may_send_update(1, "localhost:9091")
    for tier, dest, kw in ((1, "203.0.113.7:9091", {}), (1, None, {}), (2, "127.0.0.1:9091", {}),
                           (3, "127.0.0.1:9091", {})):
        with pytest.raises(PrivacyViolation):
            tiers.check_may_send_update(tier, dest, **kw)
    tiers.check_may_send_update(3, "203.0.113.7:9091", secure=True)  # tier 3: only a secure aggregator

    # a device at tier 2 refuses before it trains or records anything
    with Store(devices["phone"]) as store:
        user = store.get_user(USER)
        tiers.set_tier(store, user, 2, confirm=True)
        spec = fu.RoundSpec(round_id=fu.new_round_id(), user=USER, base_sha256="00" * 32, max_steps=1)
        with pytest.raises(PrivacyViolation, match="TEE"):
            fu.make_update(store, load_settings(home=str(devices["phone"])), store.get_user(USER), spec,
                           devices["phone"] / "work", destination="127.0.0.1:9091")
        assert "federated_update_sent" not in [a["action"] for a in store.audit_log(user.id)]
        assert not (devices["phone"] / "work").exists()


def test_a_round_trains_the_loops_layout():
    from ownlm.learn.train import TrainConfig
    from ownlm.privacy.federation import RUN_CONFIG

    from ownlm.settings import Personalization

    spec, tc = fu.RoundSpec(round_id="fr_x", user=USER, base_sha256="00" * 32), TrainConfig()
    assert (spec.r, spec.alpha) == (tc.r, tc.alpha) == (RUN_CONFIG["r"], RUN_CONFIG["alpha"])
    # and the loop's drift guard: the KL anchor weight of a local round
    assert spec.anchor_kl == Personalization().anchor_kl == RUN_CONFIG["anchor_kl"]


def test_a_plain_round_sums_float_vectors():
    from ownlm.privacy.federation import secure_aggregator

    plain = secure_aggregator(fu.RoundSpec(round_id="fr_x", user=USER, base_sha256="00" * 32), 4)
    plain.add(np.ones(4, np.float32), 2)
    assert plain.total()[1] == 2


def test_cli_join_refuses_a_server_outside_home_at_tier_1(home):
    from tests.conftest import run_cli

    with Store(home) as store:
        store.create_user(USER)
    r = run_cli("federate", "join", "--user", USER, "--superlink", "127.0.0.1:9091")
    assert r.returncode == 1 and "--ca FILE" in r.stderr, r.stderr  # TLS or an explicit --insecure, nothing implied
    r = run_cli("federate", "join", "--user", USER, "--superlink", "8.8.8.8:9091", "--insecure")
    assert r.returncode == 1 and "tier 1 (edge)" in r.stderr, r.stderr
    assert not (home / "federation" / "logs").exists()  # no SuperNode was started
    r = run_cli("federate", "server", "--help")
    assert r.returncode == 0 and "--method" in r.stdout


@pytest.mark.slow  # the gate's drift and behaviour checks: 1-5 min on 2 shared cores, though on the tiny model
def test_the_device_gate_judges_the_aggregate_on_its_own_heldout_data(one_round):
    """With the gate on (the default of `ownlm federate join`), the device judges the aggregate on its own held-out
    conversations like a remote round's bundle, and audits the verdict; the tiny random model trained one step
    does not beat the base by the gate's margin, so nothing is installed."""
    from ownlm.errors import QualityGateRefused
    from ownlm.privacy.aggregate import PlainSum, finish

    r = one_round
    lap, phone, user, state, up = r["lap"], r["phone"], r["lap"].get_user(USER), r["state"], r["update"]
    fu.verify_update(lap, user, state, up.header, up.payload)
    s = PlainSum(up.payload.shape[0])
    s.add(up.payload, up.header["weight"])
    bundles, _ = fu.aggregate_bundles(lap, r["s_lap"], user, state, finish(*s.total()), r["s_lap"].home / "w", "tiny")
    puser = phone.get_user(USER)
    with pytest.raises(QualityGateRefused):
        fu.install_aggregate(phone, r["s_phone"], puser, bundles[up.header["device"]], r["spec"].round_id, gate=True)
    assert phone.active_model(puser.id) is None
    judged = [a for a in phone.audit_log(puser.id) if a["action"] == "federated_model_judged"]
    assert len(judged) == 1 and judged[0]["detail"]["passed"] is False


def test_the_default_latent_update_is_trained_with_dp_and_spends_the_smallest_epsilon(devices):
    """The CLI's default method (latent: QAT latents averaged) reads its latents from a DP-SGD checkpoint; a device
    uses DP when its tier, the round or the user asks, at the smallest epsilon that applies."""
    from ownlm.basemodel import base_sha256, resolve_base

    settings = load_settings(home=str(devices["phone"]))
    always = load_settings(home=str(devices["phone"]), personalization={"federation_dp": "always", "federation_dp_epsilon": 6.0})
    with Store(devices["phone"]) as phone:
        user = phone.get_user(USER)
        sha = base_sha256(resolve_base(settings.base), settings.home)
        plain = fu.RoundSpec(round_id="fr_x", user=USER, base_sha256=sha)
        assert fu.update_epsilon(phone, settings, user, plain, tier=1) is None  # own devices, nothing asked
        assert fu.update_epsilon(phone, settings, user, plain, tier=3) is None  # the relay sees ciphertexts only
        assert fu.update_epsilon(phone, settings, user, plain, tier=0) == 8.0  # readable outside the person's devices
        assert fu.update_epsilon(phone, always, user, plain, tier=1) == 6.0
        phone.set_dp_epsilon(user.id, 3.0)
        spec = fu.RoundSpec(round_id=fu.new_round_id(), user=USER, method="latent", max_steps=1, dp_epsilon=5.0,
                            base_sha256=sha)
        assert fu.update_epsilon(phone, settings, user, spec, tier=1) == 3.0
        update, _ = fu.make_update(phone, settings, user, spec, devices["phone"] / "work", destination="127.0.0.1:9091")
        assert update.header["method"] == "latent" and 0 < update.header["dp"]["epsilon"] <= 3.0 + 1e-6
        assert update.header["dp"]["unit"] == "conversation" and update.payload.dtype == np.float32
    with pytest.raises(InvalidInput, match="dp_epsilon"):
        fu.RoundSpec(round_id="fr_x", user=USER, base_sha256="00" * 32, dp_epsilon=0)
