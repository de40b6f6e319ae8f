"""`ownlm merge` (issue 20 item 5) on the tiny random Llama: peft's methods merge installed lora1 models into one
signed, installed model; linear (1, 0) gives model A back; cat's summed rank is cut back by SVD; errors; and the
right to delete reaches merged models (their manifests name their sources' data roots)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from ownlm.artifact.sign import verify_manifest
from ownlm.basemodel import load_base
from ownlm.bitdelta import load_delta
from ownlm.bitdelta.format import TENSORS
from ownlm.cli import cli
from ownlm.errors import MergeConfigError, MergeIncompatible, NotFound, TrainedOnDeletedData
from ownlm.evaluate.metrics import delta_applied
from ownlm.node.install import install
from ownlm.node.merge import MAX_ARTIFACT_BYTES, METHODS, MergeConfig, check_compatible, merge_models, truncate
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.conftest import make_tiny_delta, run_cli
from tests.test_models_on_disk import capture, round_from_store

FAST = {"distill_steps": 2, "distill_seq_len": 32, "distill_batch": 2}  # keeps each merge to a second or two
IDS = list(range(5, 2000, 7))  # distillation text (token ids) for the tiny model


@pytest.fixture(scope="module")
def sources(tiny_base, tmp_path_factory):
    """Three lora1 deltas: a and b (r=8 on q/v, different seeds), c (r=4): strong enough to move the logits."""
    return {"a": make_tiny_delta(tiny_base, tmp_path_factory.mktemp("ma"), seed=1, scale=20.0),
            "b": make_tiny_delta(tiny_base, tmp_path_factory.mktemp("mb"), seed=2, scale=20.0),
            "c": make_tiny_delta(tiny_base, tmp_path_factory.mktemp("mc"), seed=3, scale=20.0, r=4)}


@pytest.fixture(scope="module")
def fp32_base(tiny_base):
    return load_base(load_settings(base=str(tiny_base), device="cpu"))


@pytest.fixture
def node(home, tiny_base, sources, monkeypatch):
    """alice with v1 (model a) and v2 (model b), each from a dataset of her conversations recorded in the store."""
    monkeypatch.setenv("OWNLM_BASE", str(tiny_base))
    settings = load_settings(device="cpu")
    with Store(home) as store:
        alice = store.create_user("alice")
        conv_a = capture(store, alice, "A", 2, 1000.0)
        v1, _ = round_from_store(store, settings, alice, sources["a"], 1)
        conv_b = capture(store, alice, "B", 2, 3000.0)
        v2, _ = round_from_store(store, settings, alice, sources["b"], 2)
        yield settings, store, alice, v1, v2, conv_a, conv_b


def logits(base, delta=None) -> torch.Tensor:
    ids = torch.tensor([[1, 17, 300, 4021, 88, 9, 1234, 77]])
    with torch.no_grad():
        if delta is None:
            return base.model(ids).logits[0].float()
        with delta_applied(base.model, delta, base.sha256):
            return base.model(ids).logits[0].float()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_installs_a_signed_model_that_loads_and_serves(node, fp32_base, method):
    settings, store, alice, v1, v2, *_ = node
    density = 0.5 if method in ("ties", "dare_linear", "dare_ties") else None
    done = merge_models(store, settings, ["1", "2"], alice, MergeConfig(method=method, density=density, **FAST),
                        base=fp32_base, distill_ids=IDS)
    res, manifest = done.installed, done.manifest
    assert res.version == 3 and store.active_model(alice.id)["id"] == res.model_id
    row = store.model(alice.id, res.model_id)
    assert verify_manifest(row["manifest"], store.trusted_signers())  # signed, by a key this node trusts
    assert row["manifest"] == manifest and manifest["versioning"]["previous"] == v2
    merge = manifest["merge"]
    assert merge["method"] == method and merge["weights"] == [0.5, 0.5] and merge["density"] == density
    assert [s["model_id"] for s in merge["sources"]] == [v1, v2] and merge["rank"] == 8
    for s in merge["sources"]:
        assert s["delta_sha256"] == store.model(alice.id, s["model_id"])["manifest"]["files"][TENSORS]["sha256"]
        assert len(s["manifest_sha256"]) == 64 and s["user"] == "alice"
    roots = [store.model(alice.id, m)["manifest"]["dataset"]["merkle_root"] for m in (v1, v2)]
    assert manifest["dataset"]["sources"] == [{"user_id": alice.id, "merkle_root": r} for r in roots]
    delta = load_delta(res.path, expect_base_sha256=fp32_base.sha256)  # the installed files, verified
    assert delta.mode == "lora1" and delta.lora_r == 8 and delta.nbytes <= MAX_ARTIFACT_BYTES
    plain, merged = logits(fp32_base), logits(fp32_base, delta)
    assert torch.isfinite(merged).all() and (merged - plain).abs().max() > 0.05  # it changes the model
    assert any(e["action"] == "merged" and e["detail"]["model"] == res.model_id for e in store.audit_log(alice.id))


def test_linear_with_weights_one_zero_gives_model_a_back(node, fp32_base):
    settings, store, alice, v1, v2, *_ = node
    a = load_delta(store.model(alice.id, v1)["path"])
    done = merge_models(store, settings, [v1, v2], alice, MergeConfig(method="linear", weights=(1.0, 0.0), **FAST),
                        base=fp32_base, distill_ids=IDS)
    merged = load_delta(done.installed.path)
    want, got, plain = logits(fp32_base, a), logits(fp32_base, merged), logits(fp32_base)
    assert (want - plain).abs().max() > 0.05
    # lora1 re-compression of A's own signs x scale is exact up to fp16 scale rounding
    assert torch.allclose(got, want, atol=2e-3), (got - want).abs().max()
    assert done.report["distill"]["before"] < 1e-6


def test_cat_of_two_ranks_is_cut_back_to_the_target_rank_by_svd(node, fp32_base, sources):
    settings, store, alice, v1, v2, *_ = node
    data, _ = _bundle(store, alice, sources["c"], 3)  # a rank-4 model as v3
    install(store, settings, data)
    with pytest.raises(MergeIncompatible, match="one rank"):  # linear needs equal ranks
        merge_models(store, settings, ["1", "3"], alice, MergeConfig(**FAST), base=fp32_base, distill_ids=IDS)
    done = merge_models(store, settings, ["1", "3"], alice, MergeConfig(method="cat", **FAST), base=fp32_base,
                        distill_ids=IDS)
    assert done.report["merged_rank"] == 12 and done.report["rank"] == 8 and done.manifest["merge"]["merged_rank"] == 12
    assert load_delta(done.installed.path).lora_r == 8
    # the distilled scales bring the 1-bit model closer to the exact (rank-12) merge than the mean |x| scales
    assert done.report["distill"]["after"] <= done.report["distill"]["before"]
    four = merge_models(store, settings, ["1", "3"], alice, MergeConfig(method="cat", rank=4, distill_steps=0),
                        base=fp32_base)
    assert load_delta(four.installed.path).lora_r == 4


def test_truncate_keeps_the_best_low_rank_product():
    torch.manual_seed(0)
    a, b = torch.randn(12, 40), torch.randn(30, 12)
    a8, b8 = truncate(a, b, 8)
    assert a8.shape == (8, 40) and b8.shape == (30, 8)
    s = torch.linalg.svdvals((b @ a).double())
    err = torch.linalg.matrix_norm((b @ a - b8 @ a8).double())  # Eckart-Young: the tail singular values
    assert torch.allclose(err, s[8:].square().sum().sqrt(), rtol=1e-4)
    assert truncate(a8, b8, 8)[0] is a8  # nothing to cut


def test_errors(node, fp32_base, sources):
    settings, store, alice, v1, v2, *_ = node
    with pytest.raises(NotFound, match="no model '9'"):
        merge_models(store, settings, ["1", "9"], alice, MergeConfig(**FAST), base=fp32_base)
    with pytest.raises(MergeConfigError, match="3 weights for 2 models"):
        merge_models(store, settings, ["1", "2"], alice, MergeConfig(weights=(1, 1, 1)), base=fp32_base)
    with pytest.raises(MergeConfigError, match="at least two"):
        merge_models(store, settings, ["1"], alice, MergeConfig(), base=fp32_base)
    with pytest.raises(MergeConfigError, match="named twice"):
        merge_models(store, settings, ["1", v1], alice, MergeConfig(), base=fp32_base)
    with pytest.raises(MergeConfigError, match="all weights are zero"):
        MergeConfig(weights=(0, 0))
    with pytest.raises(MergeConfigError, match="needs a density"):
        MergeConfig(method="dare_ties")
    with pytest.raises(MergeConfigError, match="takes no density"):
        MergeConfig(method="linear", density=0.5)
    with pytest.raises(MergeConfigError, match=r"not in \(0, 1\]"):
        MergeConfig(method="ties", density=1.5)
    with pytest.raises(MergeConfigError, match="unknown merge method"):
        MergeConfig(method="average")
    with pytest.raises(MergeConfigError, match="above the merged rank"):
        merge_models(store, settings, ["1", "2"], alice, MergeConfig(rank=12), base=fp32_base)
    with pytest.raises(MergeConfigError, match="budget"):
        merge_models(store, settings, ["1", "2"], alice, MergeConfig(method="cat", rank=16, max_bytes=600), base=fp32_base)
    a = load_delta(store.model(alice.id, v1)["path"])
    with pytest.raises(MergeIncompatible, match="made for base"):
        check_compatible([a, dataclasses.replace(a, base_sha256="0" * 64)], a.base_sha256)
    with pytest.raises(MergeIncompatible, match="other weights"):
        check_compatible([a, load_delta(make_tiny_delta(settings.base, settings.home.parent / "k", modules=("k_proj",
                          "v_proj")) / "delta")], a.base_sha256)
    assert store.max_version(alice.id) == 2  # nothing was installed


def test_cli_errors_are_one_line_each(node):
    settings, *_ = node
    runner = CliRunner()
    for args, error, text in [(["1", "9"], NotFound, "alice has no model '9'"),
                              (["1", "2", "--weights", "1,x"], MergeConfigError, "comma-separated"),
                              (["1", "2", "--weights", "1,1,1"], MergeConfigError, "3 weights for 2 models"),
                              (["1", "2", "--method", "ties"], MergeConfigError, "needs a density"),
                              (["1", "2", "--density", "0.3"], MergeConfigError, "takes no density")]:
        result = runner.invoke(cli, ["merge", "--user", "alice", *args])
        assert isinstance(result.exception, error) and text in result.exception.message, (args, result.exception)


def test_the_cli_merges_into_a_new_user(home, node):
    """The real command in a process: alice's two models become the starting model of a new user, dana."""
    settings, store, alice, v1, v2, *_ = node
    store.close()
    env = {"OWNLM_BASE": str(settings.base), "OWNLM_DEVICE": "cpu"}
    out = run_cli("merge", "--user", "alice", "1", "2", "--method", "dare_ties", "--density", "0.6", "--weights",
                  "0.7,0.3", "--into", "dana", "--distill-steps", "1", env=env)
    assert out.returncode == 0, out.stderr
    assert "installed pm_" in out.stdout and "for dana" in out.stdout and "dare_ties" in out.stdout
    listed = run_cli("models", "--user", "dana", env={**env, "COLUMNS": "200"})
    assert listed.returncode == 0 and "merged (dare_ties) from alice v1, alice v2" in listed.stdout, listed.stdout
    with Store(home) as again:
        dana = again.get_user("dana")
        m = again.active_model(dana.id)
        assert m["version"] == 1 and m["manifest"]["merge"]["weights"] == [0.7, 0.3]
        assert m["manifest"]["model"]["user"] == "dana" and m["signer"] in again.signers_for(dana.id)
    bad = run_cli("merge", "--user", "alice", "1", "2", "--method", "ties", env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: method ties needs a density") and "Traceback" not in bad.stderr


def _bundle(store, user, delta_root, version, merge=None):
    from ownlm.artifact.bundle import make_bundle

    return make_bundle(delta_dir=delta_root / "delta", report=json.loads((delta_root / "report.json").read_text()),
                       user_name=user.name, signing_key=store.signing_key(user.id), recipient=store.node_key().public_json(),
                       base_name="tiny", version=version, previous=None, created_at=1_790_000_000 + version * 3600,
                       merge=merge)


def test_deleting_a_source_conversation_removes_the_merged_model(node, fp32_base, sources):
    settings, store, alice, v1, v2, conv_a, conv_b = node
    done = merge_models(store, settings, ["1", "2"], alice, MergeConfig(distill_steps=0), base=fp32_base)
    merged = done.installed
    # the same sources' data named by another bundle, to replay after the delete
    replay, _ = _bundle(store, alice, sources["a"], 9, merge={"method": "linear", "sources": [],
                                                              "data": done.manifest["dataset"]["sources"]})
    assert set(store.delete_preview(alice.id, conversation_id=conv_b[0])["models"]) == {merged.model_id, v2}
    res = store.delete_data(alice.id, conversation_id=conv_b[0])
    assert set(res["models_removed"]) == {merged.model_id, v2} and res["active_model"] == v1
    assert not merged.path.exists() and [m["id"] for m in store.models(alice.id)] == [v1]
    with pytest.raises(TrainedOnDeletedData):  # install's check reads the merged manifest's sources
        install(store, settings, replay)
    # a source kept on purpose after its data was deleted is refused as a merge source
    data, _ = _bundle(store, alice, sources["b"], 10)
    install(store, settings, data)
    store.delete_data(alice.id, conversation_id=conv_a[0], keep_models=True)
    with pytest.raises(TrainedOnDeletedData, match="deleted since"):
        merge_models(store, settings, [v1, "10"], alice, MergeConfig(distill_steps=0), base=fp32_base)


def test_another_users_deleted_data_removes_the_model_merged_from_it(node, fp32_base, sources):
    """bob's model and alice's are merged into carol's; bob deletes his conversations: carol's model goes."""
    settings, store, alice, v1, v2, *_ = node
    bob = store.create_user("bob")
    conv = capture(store, bob, "bob", 2, 5000.0)
    round_from_store(store, settings, bob, sources["b"], 1)
    carol = store.create_user("carol")
    done = merge_models(store, settings, ["alice:2", "bob:1"], alice, MergeConfig(distill_steps=0), into=carol,
                        base=fp32_base)
    sources_data = done.manifest["dataset"]["sources"]
    assert {s["user_id"] for s in sources_data} == {alice.id, bob.id}
    assert store.active_model(carol.id)["id"] == done.installed.model_id
    preview = store.delete_preview(bob.id, conversation_id=conv[0])
    assert preview["models_elsewhere"] == {carol.id: [done.installed.model_id]}
    res = store.delete_data(bob.id, conversation_id=conv[0])
    assert res["models_removed_elsewhere"] == {carol.id: [done.installed.model_id]}
    assert store.active_model(carol.id) is None and store.models(carol.id) == [] and not done.installed.path.exists()
    assert store.active_model(alice.id)["id"] == v2  # alice's own models learned nothing of bob's
