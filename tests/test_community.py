"""The community model (privacy/community.py): opt-in and tier rules, a pairwise-masked round of 3 DP-trained
participants summed by an aggregator process that sees only masked uint64 vectors, incomplete/tampered/replayed
contributions refused and audited, the signed community adapter, and a new user's first round starting from it
only when they asked for it (on the tiny random Llama, real SQLCipher store).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ownlm.bitdelta.lora1 import read_adapter
from ownlm.errors import InvalidInput, PrivacyViolation, UpdateRefused
from ownlm.learn.train import TrainConfig, train
from ownlm.privacy import aggregate as agg
from ownlm.privacy import community as cm
from ownlm.privacy import secure_agg as sa
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.conftest import run_cli
from tests.test_train import examples, quick, tiny  # noqa: F401 (fixture)

LORA = TrainConfig()  # the default LoRA settings (r, alpha) every participant trains with


def test_opt_in_is_off_by_default_refused_at_tiers_1_and_2_and_audited(home):
    with Store(home) as store:
        users = {t: store.create_user(f"u{t}", tier=t) for t in range(4)}
        for u in users.values():
            assert store.community(u.id) == {"contribute": False, "start": False}
        for t in (1, 2):
            with pytest.raises(PrivacyViolation, match=f"tier {t}"):
                cm.set_choice(store, users[t], contribute=True)
            assert store.community(users[t].id)["contribute"] is False
            assert cm.set_choice(store, users[t], start=True)["start"] is True  # using it shares nothing
        for t in (0, 3):
            assert cm.set_choice(store, users[t], contribute=True) == {"contribute": True, "start": False}
        assert cm.set_choice(store, users[3], contribute=False)["contribute"] is False
        actions = [a["action"] for a in store.audit_log(users[3].id)]
        assert actions.count("community_changed") == 2
        with pytest.raises(PrivacyViolation, match="not opted in"):
            cm.contribute(store, users[3], cm.Roster("r", "b", 8, 16), 0, b"", {}, {"epsilon": 1.0})


def test_cli_join_refuses_tier_1_and_status_shows_the_choice(home):
    with Store(home) as store:
        store.create_user("me")
    r = run_cli("community", "join", "--user", "me")
    assert r.returncode != 0 and "tier 1 (edge)" in (r.stdout + r.stderr)
    assert run_cli("privacy", "set", "3", "--user", "me").returncode == 0
    r = run_cli("community", "join", "--user", "me")
    assert r.returncode == 0, r.stderr
    r = run_cli("community", "status", "--user", "me")
    assert "contributing: yes" in r.stdout and "starts from the community model: no" in r.stdout
    assert "none on this node yet" in r.stdout


_TRAINED: list = []


@pytest.fixture
def trained(tiny, tmp_path):
    """Three participants' DP-trained (factors, budget, QAT latents) on the tiny Llama (2 DP steps each, different
    data); trained once per module (plain tensors, read back from disk)."""
    if _TRAINED:
        return _TRAINED
    out = _TRAINED
    for k in range(3):
        tok = tiny.tokenizer
        report = train(tiny, examples(tok, range(8 * k, 8 * k + 8)), examples(tok, [30, 31]),
                       quick(dp=True, dp_epsilon=8.0, dp_batch_size=4, max_steps=2, qat=True), tmp_path / f"p{k}")
        assert report.dp and report.dp["epsilon"] <= 8.0 + 1e-6
        out.append((read_adapter(tmp_path / f"p{k}" / "adapter").factors, report.dp, cm.latent_of(tmp_path / f"p{k}")))
    return out


def _round(store, tiny, n=3):
    # names long enough that they cannot turn up by chance inside a base64 signature of the manifest
    users = [store.create_user(f"participant-{i}", tier=3 if i % 2 else 0) for i in range(n)]
    for u in users:
        cm.set_choice(store, u, contribute=True)
    from ownlm.artifact.sign import public_pem

    keys = [sa.mask_keypair() for _ in users]
    members = {i: cm.Member(keys[i][1].hex(), public_pem(store.signing_key(u.id).public_key())) for i, u in enumerate(users)}
    return users, keys, cm.Roster("cr_test_1", tiny.sha256, LORA.r, LORA.alpha, members)


def _write(inbox, i, header, masked):
    (inbox / f"{i:03d}.header.json").write_text(json.dumps(header))
    (inbox / f"{i:03d}.masked.u64").write_bytes(masked.astype("<u8").tobytes())


def _aggregate(inbox) -> dict:
    r = subprocess.run([sys.executable, "-m", "ownlm.privacy.community", "aggregate", str(inbox)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads((inbox / "result.json").read_text())


@pytest.fixture
def masked_round(home, tiny, tmp_path):
    """(settings, store, users, keys, roster, inbox): three opted-in participants and the aggregator's inbox,
    which already holds the round's roster."""
    settings = load_settings(base=str(tiny.source.path), device="cpu", threads=1)
    inbox = tmp_path / "aggregator"
    inbox.mkdir()
    with Store(home) as store:
        users, keys, roster = _round(store, tiny)
        (inbox / "roster.json").write_text(roster.to_json())
        yield settings, store, users, keys, roster, inbox


def test_masked_round_sums_to_the_plain_mean_and_the_aggregator_sees_no_plaintext(masked_round, trained):
    settings, store, users, keys, roster, inbox = masked_round
    plain = []
    assert roster.method == "latent"  # the default: averaging QAT latents measured better than factors
    for i, (u, (factors, dp, latent)) in enumerate(zip(users, trained)):
        header, masked = cm.contribute(store, u, roster, i, keys[i][0], factors, dp, latent)
        assert masked.dtype == np.uint64 and "user" not in header and u.name not in json.dumps(header)
        tensors = agg.tensors_for("latent", factors, latent)
        plain.append(agg.Layout.of(tensors).flatten(tensors))
        _write(inbox, i, header, masked)
    seen = b"".join(f.read_bytes() for f in sorted(inbox.iterdir()))
    for x in plain:  # no two consecutive float32 values of any plaintext update reach the aggregator
        raw = x.astype("<f4").tobytes()
        assert not any(raw[j:j + 8] in seen for j in range(0, 4000, 4))
    result = _aggregate(inbox)
    assert result["complete"] and result["participants"] == 3 and not result["refusals"]
    mean = np.frombuffer((inbox / "mean.f32").read_bytes(), dtype="<f4")
    assert np.abs(mean - np.mean(plain, axis=0)).max() < 1e-6  # fixed point 2^-24
    manifest = cm.publish(store, settings, users[0], roster, mean, result)
    assert manifest["participants"] == 3 and manifest["epsilons"] == [dp["epsilon"] for _, dp, _ in trained]
    assert manifest["method"] == "latent"
    assert not any(u.name in json.dumps(manifest) or u.id in json.dumps(manifest) for u in users)
    got, adapter = cm.current(store, settings)
    assert got["round"] == "cr_test_1" and read_adapter(adapter).r == LORA.r
    assert [a["action"] for a in store.audit_log(users[0].id)].count("community_model_published") == 1


def test_incomplete_tampered_and_replayed_contributions_are_refused_and_audited(masked_round, trained):
    settings, store, users, keys, roster, inbox = masked_round
    made = [cm.contribute(store, u, roster, i, keys[i][0], *trained[i]) for i, u in enumerate(users)]
    for i in (0, 1):  # participant 2 never reports
        _write(inbox, i, *made[i])
    bad = made[1][1].copy()
    bad[0] ^= np.uint64(1)
    _write(inbox, 7, made[1][0], bad)  # tampered copy of 1
    _write(inbox, 8, *made[0])  # replay of 0 in the same round
    result = _aggregate(inbox)
    assert not result["complete"] and "did not report" in result["error"] and not (inbox / "mean.f32").exists()
    reasons = sorted(r["reason"].split(":")[0] for r in result["refusals"])
    assert reasons == ["replayed", "tampered"]
    with pytest.raises(InvalidInput, match="incomplete"):
        cm.publish(store, settings, users[0], roster, np.zeros(1, np.float32), result)
    refused = [a for a in store.audit_log(users[0].id) if a["action"] == "community_contribution_refused"]
    assert len(refused) == 2
    # a contribution made for an earlier round is a replay in the next one
    later = cm.Aggregator(cm.Roster("cr_test_2", roster.base_sha256, roster.r, roster.alpha, roster.members), {"cr_test_1"})
    with pytest.raises(UpdateRefused, match="replayed: made for the earlier round cr_test_1"):
        later.accept(*made[0])
    with pytest.raises(PrivacyViolation, match="differential privacy"):
        cm.contribute(store, users[0], roster, 0, keys[0][0], trained[0][0], None, trained[0][2])
    with pytest.raises(InvalidInput, match="latents"):  # a latent round needs the latents, not only the factors
        cm.contribute(store, users[0], roster, 0, keys[0][0], trained[0][0], trained[0][1])
    factors_round = cm.Roster(roster.round_id, roster.base_sha256, roster.r, roster.alpha, roster.members, "factors")
    with pytest.raises(UpdateRefused, match="averaging method"):  # a factors contribution in a latent round
        cm.Aggregator(roster).accept(*cm.contribute(store, users[0], factors_round, 0, keys[0][0], *trained[0][:2]))


def test_first_round_starts_from_the_community_adapter_only_when_asked(masked_round, tiny, trained, tmp_path):
    from ownlm.loop import _plan

    settings, store, users, keys, roster, _ = masked_round
    settings = settings.model_copy(update={"personalization": settings.personalization.model_copy(
        update={"community_min_gain": None})})  # the start itself; whether it is worth it: the next test
    a = cm.Aggregator(roster)
    for i, u in enumerate(users):
        a.accept(*cm.contribute(store, u, roster, i, keys[i][0], *trained[i]))
    cm.publish(store, settings, users[0], roster, a.mean(), a.result())
    newcomer, other = store.create_user("newcomer"), store.create_user("other")  # tier 1: may still start from it
    cm.set_choice(store, newcomer, start=True)
    train_ex = examples(tiny.tokenizer, range(40, 46))
    tcfg = quick(lr=1e-12, max_steps=1)
    plan = _plan(store, settings, newcomer.id, train_ex, tcfg, tiny.sha256, "job1")
    assert plan.init_adapter is not None and "community" in plan.why
    assert _plan(store, settings, other.id, train_ex, tcfg, tiny.sha256, "job2").init_adapter is None
    assert cm.starting_point(store, settings, other.id, tiny.sha256, {}) is None  # did not opt in
    community = read_adapter(plan.init_adapter).factors
    train(tiny, plan.examples, examples(tiny.tokenizer, [30, 31]), tcfg, tmp_path / "new", init_adapter=plan.init_adapter)
    after = read_adapter(tmp_path / "new" / "adapter").factors
    scratch = tmp_path / "scratch"
    train(tiny, plan.examples, examples(tiny.tokenizer, [30, 31]), tcfg, scratch)
    fresh = read_adapter(scratch / "adapter").factors
    for path, (ca, cb) in community.items():
        assert torch.allclose(after[path][0], ca, atol=1e-6) and torch.allclose(after[path][1], cb, atol=1e-6)
    assert any(not torch.allclose(fresh[p][1], cb, atol=1e-6) for p, (_, cb) in community.items())


def test_a_community_model_that_does_not_help_the_new_user_is_not_started_from(masked_round, tiny, trained, tmp_path):
    """community_min_gain (default 0.01 nats): the first round measures the community adapter on the new user's own
    held-out examples. The mean of three 2-step DP updates barely moves the tiny model, so the round starts from
    scratch and says why with the figures; an adapter that learned the user's kind of data passes the same check."""
    from ownlm.loop import _lora, _plan

    settings, store, users, keys, roster, _ = masked_round
    a = cm.Aggregator(roster)
    for i, u in enumerate(users):
        a.accept(*cm.contribute(store, u, roster, i, keys[i][0], *trained[i]))
    cm.publish(store, settings, users[0], roster, a.mean(), a.result())
    newcomer = store.create_user("newcomer")
    cm.set_choice(store, newcomer, start=True)
    train_ex, held = examples(tiny.tokenizer, range(40, 46)), examples(tiny.tokenizer, [46, 47, 48])
    tcfg = quick(lr=1e-12, max_steps=1)
    plan = _plan(store, settings, newcomer.id, train_ex, tcfg, tiny.sha256, "job1", base=tiny, heldout=held)
    assert plan.init_adapter is None and "not from the community model" in plan.why and "nats" in plan.why, plan.why
    g = cm.start_gain(tiny, cm.starting_point(store, settings, newcomer.id, tiny.sha256, _lora(tcfg)), held)
    assert g["gain"] < settings.personalization.community_min_gain
    no_held = _plan(store, settings, newcomer.id, train_ex, tcfg, tiny.sha256, "job2", base=tiny, heldout=[])
    assert no_held.init_adapter is None and "not tried" in no_held.why

    train(tiny, examples(tiny.tokenizer, range(0, 40)), held, quick(max_steps=12, qat=True), tmp_path / "useful")
    useful = cm.start_gain(tiny, tmp_path / "useful" / "adapter", held)
    assert useful["gain"] >= 0.01 and useful["community_nll"] < useful["base_nll"], useful

