"""Serving personal models: merged for one user, per-request hooks for several, base on request."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ownlm.artifact.bundle import make_bundle
from ownlm.basemodel import load_base
from ownlm.bitdelta import apply, load_delta
from ownlm.engine import GenerationParams
from ownlm.engine.personal import PersonalEngine
from ownlm.node.install import install, rollback
from ownlm.settings import load_settings
from ownlm.store import Store
from tests.conftest import make_tiny_delta

Q = [{"role": "user", "content": "Tell me something."}]
GREEDY = GenerationParams(max_tokens=8, temperature=0)


def deploy(store, settings, user, delta_root, version):
    data, manifest = make_bundle(delta_dir=delta_root / "delta", report=json.loads((delta_root / "report.json").read_text()),
                                 user_name=user.name, signing_key=store.signing_key(user.id),
                                 recipient=store.node_key().public_json(), base_name="tiny", version=version, previous=None,
                                 created_at=1_790_000_000 + version)
    install(store, settings, data)
    return manifest["model"]["id"]


def reference_logits(tiny_base, delta_root=None) -> torch.Tensor:
    """Next-token logits of the prompt from a separate copy of the model with the delta merged."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    if delta_root is not None:
        apply(model, load_delta(delta_root / "delta"))
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    ids = tok.apply_chat_template(Q, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def engine_logits(engine, user_id, use="personal") -> torch.Tensor:
    """The engine's next-token logits for the same prompt, through its request path (hooks selected)."""
    stream = engine.stream(Q, GREEDY, user_id=user_id, use=use)
    ids = torch.tensor([engine.encode_chat(Q)])
    with engine._lock:
        engine._begin(stream)
        try:
            with torch.no_grad():
                return engine.model(ids).logits[0, -1]
        finally:
            engine._end(stream)


@pytest.fixture
def node(home, tiny_base, tmp_path):
    settings = load_settings(base=str(tiny_base), device="cpu")
    store = Store(home)
    yield settings, store
    store.close()


def test_single_user_is_merged_and_base_is_exact(node, tiny_base, tiny_delta):
    settings, store = node
    alice = store.create_user("alice")
    engine = PersonalEngine(load_base(settings), store)
    base_ref = reference_logits(tiny_base)
    assert torch.allclose(engine_logits(engine, alice.id), base_ref, atol=1e-5)  # no model yet: base
    mid = deploy(store, settings, alice, tiny_delta, 1)
    engine.refresh()
    assert engine._merged is not None and engine._merged.model_id == (alice.id, mid)
    personal_ref = reference_logits(tiny_base, tiny_delta)
    assert not torch.allclose(personal_ref, base_ref, atol=1e-3)  # the delta matters
    assert torch.allclose(engine_logits(engine, alice.id), personal_ref, atol=1e-4)
    assert torch.allclose(engine_logits(engine, alice.id, use="base"), base_ref, atol=1e-4)
    assert engine.stream(Q, GREEDY, user_id=alice.id).text() == engine.stream(Q, GREEDY, user_id=alice.id).text()
    rollback(store, alice.id, "base")
    engine.refresh()
    assert engine._merged is None
    assert torch.allclose(engine_logits(engine, alice.id), base_ref, atol=1e-4)


def test_several_users_get_their_own_delta_per_request(node, tiny_base, tiny_delta, tmp_path):
    settings, store = node
    alice, bob, carol = store.create_user("alice"), store.create_user("bob"), store.create_user("carol")
    bob_delta = make_tiny_delta(tiny_base, tmp_path / "bob", seed=7)
    deploy(store, settings, alice, tiny_delta, 1)
    deploy(store, settings, bob, bob_delta, 1)
    base = load_base(settings)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    engine = PersonalEngine(base, store)
    assert engine._merged is None  # two personal models: none merged, the base stays untouched
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert torch.allclose(engine_logits(engine, alice.id), reference_logits(tiny_base, tiny_delta), atol=1e-4)
    assert torch.allclose(engine_logits(engine, bob.id), reference_logits(tiny_base, bob_delta), atol=1e-4)
    assert torch.allclose(engine_logits(engine, carol.id), reference_logits(tiny_base), atol=1e-5)
    # a whole generation per user, interleaved, matches the same user's generation alone
    a1 = engine.stream(Q, GREEDY, user_id=alice.id).text()
    engine.stream(Q, GREEDY, user_id=bob.id).text()
    assert engine.stream(Q, GREEDY, user_id=alice.id).text() == a1


def test_a_stream_is_routed_when_its_generation_starts(node, tiny_base, tmp_path):
    """Hot deploy: a request asked for before an install or rollback is generated by the model routed when it
    starts (never by the replaced one), on a merged node and on a per-request node."""
    settings, store = node
    alice, bob = store.create_user("alice"), store.create_user("bob")
    other = make_tiny_delta(tiny_base, tmp_path / "other", seed=7, scale=30.0)
    strong = make_tiny_delta(tiny_base, tmp_path / "strong", seed=1, scale=30.0)
    m1 = deploy(store, settings, alice, strong, 1)
    engine = PersonalEngine(load_base(settings), store)
    assert engine._merged is not None and engine._merged.model_id == (alice.id, m1)
    v1, base = engine.stream(Q, GREEDY, user_id=alice.id).text(), engine.stream(Q, GREEDY, user_id=None).text()
    asked = engine.stream(Q, GREEDY, user_id=alice.id)
    m2 = deploy(store, settings, alice, other, 2)
    engine.refresh()
    v2 = asked.text()
    assert asked.model_id == (alice.id, m2) and v2 not in (v1, base)
    deploy(store, settings, bob, strong, 1)  # two users: per-request deltas
    engine.refresh()
    asked = engine.stream(Q, GREEDY, user_id=alice.id)
    rollback(store, alice.id, "base")
    engine.refresh()
    assert asked.text() == base and asked.model_id is None
    assert engine.stream(Q, GREEDY, user_id=bob.id).text() == v1


def test_an_install_by_another_process_is_served_by_the_next_generation(node, tiny_base, tmp_path, home):
    """Without refresh or watch: the next generation reads the stored routes (here written through a second
    store connection, as `ownlm rollback` in a shell does) before it starts."""
    settings, store = node
    alice = store.create_user("alice")
    deploy(store, settings, alice, make_tiny_delta(tiny_base, tmp_path / "strong", seed=1, scale=30.0), 1)
    engine = PersonalEngine(load_base(settings), store)
    personal, base = engine.stream(Q, GREEDY, user_id=alice.id).text(), engine.stream(Q, GREEDY).text()
    assert personal != base
    with Store(home) as shell:
        rollback(shell, alice.id, "base")
    s = engine.stream(Q, GREEDY, user_id=alice.id)
    assert s.text() == base and s.model_id is None
