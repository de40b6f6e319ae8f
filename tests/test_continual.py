"""Continual learning: the round plan (pure), training from a previous adapter (tiny model), and the loop's
fallbacks to retraining after a delete (real store, real training)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ownlm.bitdelta import read_adapter
from ownlm.capture.importers import parse_file
from ownlm.store.imports import import_into
from ownlm.learn.continual import Lineage, adapter_dir, plan_round, read_lineage
from ownlm.errors import ConfigError
from ownlm.loop import run_job
from ownlm.store import Store
from ownlm.learn.train import TrainConfig, train
from tests.test_loop import first_round, loop_settings, persona_file
from tests.test_train import examples, quick, tiny  # noqa: F401  (tiny is a fixture)

LORA = {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]}


@dataclass
class Ex:
    sha256: str


def make_plan(tmp_path: Path, strategy="replay", **over):
    adapter = tmp_path / "kept"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    train_ex = [Ex(f"old{i}") for i in range(10)] + [Ex(f"new{i}") for i in range(4)]
    kw = dict(lineage=Lineage("m1", "ds1", "base", LORA, 7), adapter=adapter, old_hashes={f"old{i}" for i in range(10)},
              active_model_id="m1", base_sha256="base", lora=LORA, deleted_since=False, replay=0.5, seed="job_1")
    kw.update(over)
    return plan_round(strategy, train_ex, **kw)


def test_plan_continues_on_new_examples_and_replays_a_seeded_sample(tmp_path):
    plan = make_plan(tmp_path)
    assert plan.strategy == "replay" and plan.init_adapter == tmp_path / "kept"
    assert [e.sha256 for e in plan.examples[:4]] == ["new0", "new1", "new2", "new3"]
    assert plan.new == 4 and plan.replayed == 2 and all(e.sha256.startswith("old") for e in plan.examples[4:])
    assert [e.sha256 for e in make_plan(tmp_path).examples] == [e.sha256 for e in plan.examples]  # resumable
    cont = make_plan(tmp_path, "continue")
    assert cont.strategy == "continue" and len(cont.examples) == 4 and cont.replayed == 0


@pytest.mark.parametrize("over, why", [
    ({"lineage": None}, "no previous adapter"),
    ({"deleted_since": True}, "deleted"),
    ({"base_sha256": "other"}, "another base"),
    ({"lora": {**LORA, "r": 4}}, "LoRA settings"),
    ({"active_model_id": "m0"}, "rolled back"),
    ({"active_model_id": None}, "rolled back"),
    ({"old_hashes": {f"old{i}" for i in range(10)} | {f"new{i}" for i in range(4)}}, "no new training examples"),
])
def test_plan_retrains_from_scratch_when_continuing_is_unsafe(tmp_path, over, why):
    plan = make_plan(tmp_path, **over)
    assert plan.strategy == "retrain" and plan.init_adapter is None and why in plan.why
    assert len(plan.examples) == 14  # all of the user's data


def test_plan_continues_from_a_round_refused_for_its_habits_while_the_same_model_serves(tmp_path):
    refused = Lineage("", "ds1", "base", LORA, 7, refused_job="job_0")  # kept while the base served the user
    plan = make_plan(tmp_path, lineage=refused, active_model_id=None)
    assert plan.strategy == "replay" and plan.init_adapter == tmp_path / "kept" and "refused round job_0" in plan.why
    changed = make_plan(tmp_path, lineage=refused, active_model_id="m2")  # a model was deployed meanwhile
    assert changed.strategy == "retrain" and "changed since round job_0" in changed.why
    over_m1 = Lineage("m1", "ds1", "base", LORA, 7, refused_job="job_3")  # refused while m1 served
    assert make_plan(tmp_path, lineage=over_m1).init_adapter is not None
    assert make_plan(tmp_path, lineage=over_m1, active_model_id=None).strategy == "retrain"  # rolled back to base
    assert make_plan(tmp_path, lineage=refused, active_model_id=None, deleted_since=True).strategy == "retrain"


def test_plan_retrain_strategy_and_missing_weights(tmp_path):
    assert make_plan(tmp_path, "retrain").init_adapter is None
    (tmp_path / "empty").mkdir()
    assert "no previous adapter" in make_plan(tmp_path, adapter=tmp_path / "empty").why


def test_training_continues_from_the_given_adapter(tiny, tmp_path):
    data = examples(tiny.tokenizer, range(16))
    first = train(tiny, data, [], quick(epochs=1), tmp_path / "a")
    start = read_adapter(tmp_path / "a" / "adapter")
    # one step at a negligible learning rate: a continued adapter is (almost) its start, a fresh one has B ~ 0
    still = quick(epochs=1, max_steps=1, lr=1e-12)
    train(tiny, data, [], still, tmp_path / "b", init_adapter=tmp_path / "a" / "adapter")
    cont = read_adapter(tmp_path / "b" / "adapter")
    train(tiny, data, [], still, tmp_path / "c")
    fresh = read_adapter(tmp_path / "c" / "adapter")
    for path, (a, b) in start.factors.items():
        assert float(b.abs().max()) > 1e-4
        torch.testing.assert_close(cont.factors[path][0], a, atol=1e-6, rtol=0)
        torch.testing.assert_close(cont.factors[path][1], b, atol=1e-6, rtol=0)
        assert float(fresh.factors[path][1].abs().max()) < 1e-9  # Adam moves it by ~lr
    assert first.steps > 0


def test_continuing_from_an_adapter_with_other_settings_is_refused(tiny, tmp_path):
    data = examples(tiny.tokenizer, range(8))
    train(tiny, data, [], quick(epochs=1, max_steps=1), tmp_path / "a")
    with pytest.raises(ConfigError, match="cannot continue from adapter.*r=1") as e:
        train(tiny, data, [], quick(epochs=1, max_steps=1, r=4), tmp_path / "b", init_adapter=tmp_path / "a" / "adapter")
    assert "train from scratch" in e.value.hint
    assert not (tmp_path / "b" / "adapter").exists()


def test_a_delete_removes_the_kept_adapter_and_the_next_round_retrains(home, tiny_base, tmp_path):
    settings = loop_settings(tiny_base)
    with Store(home) as store:
        user, job = first_round(store, settings, tmp_path)
        assert job["result"]["continual"]["strategy"] == "retrain"
        lineage = read_lineage(home, user.id)
        assert lineage.model_id == store.active_model(user.id)["id"] and lineage.dataset_id == job["result"]["dataset"]
        kept = adapter_dir(home, user.id)
        assert (kept / "adapter_model.safetensors").is_file()

        import_into(store, user.id, parse_file(persona_file(tmp_path, 40, 60)), "bram")
        victim = store.list_conversations(user.id)[0]["id"]
        store.delete_data(user.id, conversation_id=victim)
        assert not kept.exists()  # right to delete: weights that learned the conversation are gone at once
        job = run_job(store, settings, store.enqueue_job(user.id, "round 2"))
        assert job["state"] == "deployed", job["reason"]
        assert job["result"]["continual"]["strategy"] == "retrain"
        assert "no previous adapter" in job["result"]["continual"]["why"]
        assert read_lineage(home, user.id).model_id == store.active_model(user.id)["id"]


def test_a_delete_during_a_round_is_caught_by_the_audit_mark(home, tiny_base, tmp_path):
    """A delete that happens after the round read the data: the adapter it keeps must not be continued."""
    settings = loop_settings(tiny_base)
    with Store(home) as store:
        user, _ = first_round(store, settings, tmp_path)
        lineage = read_lineage(home, user.id)
        with store.tx() as db:  # a delete recorded after the round's audit mark, its files untouched
            store.audit(db, user.id, "deleted", messages=1, conversations=1, scope="conversation")
        assert store.deleted_since(user.id, lineage.audit_mark)
        import_into(store, user.id, parse_file(persona_file(tmp_path, 40, 60)), "bram")
        job = run_job(store, settings, store.enqueue_job(user.id, "round 2"))
        assert job["result"]["continual"]["strategy"] == "retrain"
        assert "deleted" in job["result"]["continual"]["why"]


def test_a_round_refused_only_for_its_habits_is_where_the_next_round_starts(home, tiny_base, tmp_path):
    """bram's replies all start with "Ahoy!"; asking every held-out answer to show it (gate_min_habit 1) refuses
    the tiny model's round for its habit alone, so it keeps its adapter and round 2 continues from it."""
    settings = loop_settings(tiny_base, gate_behaviour=True, gate_min_habit=1.0)
    # the strongest penalty keeps the random model's answers from looping (a loop is not a habit-only refusal)
    settings = settings.model_copy(update={"repetition_penalty": 2.0})
    with Store(home) as store:
        user = store.create_user("bram")
        import_into(store, user.id, parse_file(persona_file(tmp_path, 0, 40)), "bram")
        job = run_job(store, settings, store.enqueue_job(user.id, "round 1"))
        assert job["state"] == "refused" and "Ahoy!" in job["reason"], job["reason"]
        loops = job["result"]["behaviour"]["degenerate"]
        assert job["result"]["resumable"] == (loops["personal"] <= loops["base"]), loops
        if not job["result"]["resumable"]:
            pytest.skip(f"the tiny model's round looped more than the base ({loops}): not a habit-only refusal")
        assert job["result"]["kept_for_next_round"] and store.active_model(user.id) is None
        lineage = read_lineage(home, user.id)
        assert lineage.refused_job == job["id"] and lineage.model_id == ""

        import_into(store, user.id, parse_file(persona_file(tmp_path, 40, 60)), "bram")
        job2 = run_job(store, settings, store.enqueue_job(user.id, "round 2"))
        assert job2["result"]["continual"]["strategy"] == "replay", job2["result"]["continual"]
        assert f"refused round {job['id']}" in job2["result"]["continual"]["why"]

        off = settings.model_copy(update={"personalization": settings.personalization.model_copy(
            update={"continue_refused": False})})
        store.delete_data(user.id, conversation_id=store.list_conversations(user.id)[0]["id"])
        job3 = run_job(store, off, store.enqueue_job(user.id, "round 3"))
        assert job3["state"] == "refused" and "kept_for_next_round" not in job3["result"]
        assert read_lineage(home, user.id) is None  # the delete forgot it, and a refused round keeps none when off
