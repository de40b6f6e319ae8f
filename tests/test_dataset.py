import json
from collections import Counter

import pytest

from ownlm.learn.merkle import InclusionProof, merkle_root, prove, verify
from ownlm.learn.dataset import DatasetConfig, build, mark_targets, paths, tokenize, windows
from ownlm.errors import ConfigError, InvalidInput
from ownlm.store.redact import redact
from ownlm.store import NewMessage, Store
from ownlm.learn.tokens import IGNORE
from tests.conftest import run_cli
from tests.sqlcipher_pages import decrypted_pages


@pytest.fixture(scope="module")
def tokenizer(embedded_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_checkpoint))


def row(mid, parent, role, content):
    return {"id": mid, "parent_id": parent, "role": role, "content": content}


def test_paths_follow_branches():
    msgs = [row("a", None, "user", "q"), row("b", "a", "assistant", "r1"), row("c", "a", "assistant", "r2"),
            row("d", "c", "user", "q2"), row("e", "d", "assistant", "r3")]
    assert [[m["id"] for m in p] for p in paths(msgs)] == [["a", "b"], ["a", "c", "d", "e"]]
    # a parent that was deleted makes its child a root
    assert [[m["id"] for m in p] for p in paths([row("x", "gone", "user", "q")])] == [["x"]]


def test_feedback_decides_targets():
    path = [row("1", None, "user", "q"), row("2", "1", "assistant", "bad"), row("3", "2", "user", "q2"),
            row("4", "3", "assistant", "meh"), row("5", "4", "user", "q3"), row("6", "5", "assistant", "good")]
    stats = Counter()
    out = mark_targets(path, {"2": {"thumbs": -1}, "4": {"edit": "much better", "thumbs": -1}, "6": {"rating": 5}}, 2, stats)
    assert [m["target"] for m in out] == [False, False, False, True, False, True]
    assert out[3]["content"] == "much better"  # the edit is the target, even after a thumbs down
    assert out[1]["content"] == "bad"  # a refused reply stays as context
    assert stats == {"targets_edited": 1, "targets_refused_negative_feedback": 1}


def test_windows_fit_and_end_in_targets():
    msgs = []
    for i in range(10):
        msgs += [{"role": "user", "content": f"q{i}", "target": False}, {"role": "assistant", "content": f"a{i}", "target": True}]
    count = lambda w: 10 * len(w)  # noqa: E731 — 10 tokens per message
    ws = windows(msgs, count, 45, Counter())
    assert all(count(w) <= 45 and w[-1]["target"] and w[0]["role"] == "user" for w in ws)
    assert sum(m["target"] for w in ws for m in w) == 10  # every reply is a target exactly once
    stats = Counter()
    assert windows(msgs[:2], count, 15, stats) == [] and stats["targets_dropped_too_long"] == 1


def test_redaction():
    text, hits = redact("mail jane@corp.io, card 4111 1111 1111 1111, key sk-proj-abcdefghijklmnopqrstuv123, "
                        "call +44 20 7946 0958, password=hunter2hunter2; not a card 1234 5678 9012 3456 7")
    assert "jane@corp.io" not in text and "4111" not in text and "sk-proj" not in text and "7946" not in text
    assert "hunter2" not in text and "password=[SECRET]" in text
    assert hits["EMAIL"] == hits["CARD"] == hits["API_KEY"] == hits["SECRET"] == 1
    assert redact("In 2023 we met 3 times at 10:30, version 1.2.3")[1] == Counter()


def conversations(n, turns=2):
    convs = {}
    for c in range(n):
        rows, parent = [], None
        for t in range(turns):
            rows.append(row(f"{c}u{t}", parent, "user", f"question {t} of chat {c}"))
            rows.append(row(f"{c}a{t}", f"{c}u{t}", "assistant", f"answer {t} of chat {c}, mail me at a{c}@x.org"))
            parent = f"{c}a{t}"
        convs[f"conv{c:03d}"] = rows
    return convs


def test_build_splits_by_conversation_and_tokenizes(tokenizer):
    built = build(conversations(40), {}, tokenizer, DatasetConfig(heldout_fraction=0.2))
    train, held = built.split("train"), built.split("heldout")
    assert {e.conversation_id for e in train}.isdisjoint({e.conversation_id for e in held})
    assert 0 < len({e.conversation_id for e in held}) < 40
    assert not any(e.augmented for e in held) and any(e.augmented for e in train)
    assert built.stats["redacted_email"] == 80 and "@x.org" not in json.dumps([e.messages for e in built.examples])
    assert built.merkle_root == merkle_root([e.sha256 for e in built.examples])
    for tok in tokenize(train[:5], tokenizer):
        assert len(tok.input_ids) == len(tok.labels) and tok.n_loss_tokens > 0
        assert tokenizer.decode([t for t, l in zip(tok.input_ids, tok.labels) if l != IGNORE]).endswith("<|im_end|>")
    # same data, same split and root: the dataset is reproducible
    assert build(conversations(40), {}, tokenizer, DatasetConfig(heldout_fraction=0.2)).merkle_root == built.merkle_root


def test_build_removes_duplicates_and_refuses_too_little(tokenizer):
    convs = conversations(12, turns=1)
    dup = {f"copy{k}": [dict(r) for r in v] for k, v in convs.items()}  # same text, other conversations
    built = build({**convs, **dup}, {}, tokenizer, DatasetConfig(heldout_fraction=0))
    assert built.stats["duplicates_removed"] == 12 and len([e for e in built.examples if not e.augmented]) == 12
    with pytest.raises(InvalidInput, match="only 3 training examples"):
        build(conversations(3, turns=1), {}, tokenizer, DatasetConfig(heldout_fraction=0))
    with pytest.raises(ConfigError):
        DatasetConfig(max_seq_len=10)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 17])
def test_merkle_proofs(n):
    leaves = [f"{i:064x}" for i in range(n)]
    root = merkle_root(leaves)
    for i in range(n):
        p = prove(leaves, i)
        assert verify(p) and verify(p, root)
        assert verify(InclusionProof.from_json(json.loads(json.dumps(p.to_json()))))
        forged = InclusionProof(p.index, f"{n + 1:064x}", p.path, p.root)
        assert not verify(forged)
    assert not verify(prove(leaves, 0), "00" * 32)
    assert merkle_root(leaves) != merkle_root(leaves[::-1]) or n == 1


def test_store_keeps_datasets_and_delete_blanks_them(home, tokenizer):
    marker = "MARKER-dataset-4d1e-heron"
    with Store(home) as s:
        u = s.create_user("me")
        for c in range(12):
            s.capture(u.id, [NewMessage("user", f"q{c} {marker}"), NewMessage("assistant", f"a{c} {marker}")], source="api", seed=f"s{c}")
        convs, fb = s.training_view(u.id)
        # conversation ids are random here, so the held-out share varies: do not depend on a minimum
        built = build(convs, fb, tokenizer, DatasetConfig(heldout_fraction=0.2, min_examples=1))
        ds = s.save_dataset(u.id, built, {})
        rows = s.dataset_examples(u.id, ds)
        assert [r["sha256"] for r in rows] == [e.sha256 for e in built.examples]
        s.delete_data(u.id)
        rows = s.dataset_examples(u.id, ds)
        assert all(r["messages"] is None for r in rows)  # text gone, hashes stay
        assert verify(prove([r["sha256"] for r in rows], 0), s.dataset_info(u.id, ds)["merkle_root"])
    key = (home / "store.key").read_bytes()
    assert not any(marker.encode() in p for p in decrypted_pages(home / "store.db", key))


def test_cli_dataset_and_audit(home, model_cache_home, tmp_path):
    import shutil

    shutil.copytree(model_cache_home / "cache", home / "cache")  # the tokenizer cache, not the model
    r = run_cli("dataset", "build")
    assert r.returncode == 1 and ("no user" in r.stderr or "no stored conversations" in r.stderr)
    fixture = tmp_path / "chats.jsonl"
    fixture.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                          {"role": "assistant", "content": f"hi number {i}"}]}) for i in range(30)))
    assert run_cli("import", str(fixture)).returncode == 0
    r = run_cli("dataset", "build")
    assert r.returncode == 0, r.stderr
    proof = tmp_path / "proof.json"
    assert run_cli("audit", "prove", "2", "--out", str(proof)).returncode == 0
    assert "ok: example 2" in run_cli("audit", "verify", str(proof)).stdout
    doc = json.loads(proof.read_text())
    doc["example"][-1]["content"] += "!"
    proof.write_text(json.dumps(doc))
    bad = run_cli("audit", "verify", str(proof))
    assert bad.returncode == 1 and "changed" in bad.stderr
    assert "dataset_built" in run_cli("audit", "log").stdout
