"""Spreading users' adapters over llama.cpp replicas (engine/replicas.py): pure planning, then the llama engine
with one adapter per replica on the tiny GGUF (routing, deploys that rebuild one replica, rollbacks)."""

from __future__ import annotations

import pytest

from ownlm.basemodel import base_sha256, resolve_base
from ownlm.engine.llama import LlamaPersonalEngine
from ownlm.engine.replicas import assign, rebuilt
from ownlm.node.install import rollback
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.test_llama_engine import GREEDY, Q, engine, gguf_delta, world  # noqa: F401  (fixtures)
from tests.test_personal_engine import deploy


def user(key):
    return key[0]


def test_new_keys_fill_replicas_up_to_the_capacity_and_open_new_ones():
    plan = assign([[]], [("a", 1), ("b", 1), ("c", 1)], 2, user)
    assert plan == [[("a", 1), ("b", 1)], [("c", 1)]]
    assert assign([], [], 2) == [[]] and assign([[("a", 1)]], [], 2) == [[]]  # always one, for the base
    assert assign([], ["x", "y", "z"], None) == [["x", "y", "z"]]  # unbounded: one replica
    with pytest.raises(ValueError):
        assign([], ["x"], 0)


def test_a_users_new_version_takes_the_place_of_the_old_one_and_others_stay():
    current = [[("a", 1), ("b", 1)], [("c", 1), ("d", 1)]]
    plan = assign(current, [("a", 1), ("b", 1), ("c", 1), ("d", 2)], 2, user)
    assert plan == [[("a", 1), ("b", 1)], [("c", 1), ("d", 2)]]
    assert rebuilt(current, plan) == [1]  # one deploy, one replica rebuilt
    # a rollback to the base removes the key; an emptied replica goes, the others are untouched
    plan = assign(current, [("a", 1), ("b", 1)], 2, user)
    assert plan == [[("a", 1), ("b", 1)]] and rebuilt(current, plan) == []
    # the old replica is full: the new version goes where there is room
    full = [[("a", 1), ("b", 1)], [("c", 1)]]
    assert assign(full, [("a", 1), ("b", 1), ("c", 1), ("e", 1)], 2, user) == [[("a", 1), ("b", 1)], [("c", 1), ("e", 1)]]


def test_every_key_is_placed_once_and_no_replica_overflows():
    keys = [(f"u{i}", 1) for i in range(23)]
    plan = assign([], keys, 4, user)
    assert sorted(k for r in plan for k in r) == sorted(keys) and max(map(len, plan)) == 4 and len(plan) == 6
    moved = assign(plan, [(u, 2 if int(u[1:]) % 5 == 0 else 1) for u, _ in keys], 4, user)
    assert len(moved) == 6 and len(rebuilt(plan, moved)) == len({i for i, r in enumerate(plan)
                                                                   for u, _ in r if int(u[1:]) % 5 == 0})


def test_two_replicas_serve_each_user_their_model_and_a_deploy_rebuilds_one(world, engine, home, tmp_path):  # noqa: F811
    settings = load_settings(base=str(world["gguf"]), device="cpu")
    sha = base_sha256(resolve_base(settings.base), settings.home)
    want = {name: engine.stream(Q, GREEDY, adapter=name).text() for name in ("a", "b", None)}
    with Store(home) as store:
        alice, bob = store.create_user("alice"), store.create_user("bob")
        a1 = deploy(store, settings, alice, gguf_delta(world["deltas"]["a"], sha, tmp_path / "a1"), 1)
        b1 = deploy(store, settings, bob, gguf_delta(world["deltas"]["b"], sha, tmp_path / "b1"), 1)
        personal = LlamaPersonalEngine(world["gguf"], world["tok"], store, sha, "tiny", threads=1, max_adapters=1)
        assert sorted(personal.replicas) == sorted([[(alice.id, a1)], [(bob.id, b1)]])
        for _ in range(2):  # alternate users: each request goes to the replica holding its model
            assert personal.stream(Q, GREEDY, user_id=alice.id).text() == want["a"]
            assert personal.stream(Q, GREEDY, user_id=bob.id).text() == want["b"]
            assert personal.stream(Q, GREEDY, user_id=bob.id, use="base").text() == want[None]
        bobs = next(r for r in personal._replicas if (bob.id, b1) in r.ids)

        a2 = deploy(store, settings, alice, gguf_delta(world["deltas"]["b"], sha, tmp_path / "a2"), 2)  # b's delta
        waiting = personal.stream(Q, GREEDY, user_id=alice.id)  # asked before the deploy is seen
        assert personal.refresh_if_changed()
        assert sorted(personal.replicas) == sorted([[(alice.id, a2)], [(bob.id, b1)]])
        assert any(r is bobs for r in personal._replicas)  # bob's replica was not rebuilt
        assert waiting.text() == want["b"] and waiting.model_id == (alice.id, a2)
        assert personal.stream(Q, GREEDY, user_id=bob.id).text() == want["b"]

        rollback(store, alice.id, "base")
        assert personal.refresh_if_changed() and personal.replicas == [[(bob.id, b1)]]
        assert personal._replicas[0] is bobs
        assert personal.stream(Q, GREEDY, user_id=alice.id).text() == want[None]
        assert personal.stream(Q, GREEDY, user_id=bob.id).text() == want["b"]
