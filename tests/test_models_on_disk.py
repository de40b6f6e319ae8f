"""Models on disk (issue 14, items 2-4): a moved or copied home keeps and serves its models, recovery never
deletes a complete model, a manifest cannot name a path, a key signs only for its users, and the right to
delete reaches the models trained on the deleted data. Real store, real bundles, real servers on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from ownlm.api.app import create_app
from ownlm.artifact.bundle import MANIFEST, make_bundle
from ownlm.artifact.manifest import build_manifest, canonical
from ownlm.artifact.seal import seal
from ownlm.artifact.sign import generate, key_id, public_pem, sign_manifest
from ownlm.basemodel import load_tokenizer
from ownlm.bitdelta.format import METADATA, TENSORS, load_delta, read_metadata
from ownlm.learn.dataset import DatasetConfig, build, config_dict
from ownlm.errors import AuthError, CorruptArtifact, SignatureError, TrainedOnDeletedData
from ownlm.node.install import install, recover
from ownlm.settings import load_settings
from ownlm.store import NewMessage, Store
from tests.conftest import run_cli
from tests.servers import ProcessServer, ThreadServer
from tests.sqlcipher_pages import decrypted_pages
from tests.test_node import make, node  # noqa: F401  (node is a fixture)

MARKER = "MARKER-models-8e1f-pangolin"


def tree(root: Path) -> dict:
    """Every path under root with its size and mtime, the store's own files left out (they change on reads)."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if not p.name.startswith("store.db")}


def model_files(home: Path, needle: str) -> list[Path]:
    """Files under home/models whose path or bytes name `needle` (a model id)."""
    return [p for p in (home / "models").rglob("*") if needle in str(p) or (p.is_file() and needle.encode() in p.read_bytes())]


# --- item 2: a moved, copied or restored home keeps its models --------------------------------------------------

def installed_home(tmp_path, tiny_base, tiny_delta, versions=(1, 2)):
    home = tmp_path / "orig"
    settings = load_settings(home=str(home), base=str(tiny_base))
    with Store(home) as store:
        alice = store.create_user("alice")
        token = store.create_token(alice.id)
        ids = [install(store, settings, make(store, alice, tiny_delta, v)[0]).model_id for v in versions]
    return home, alice, token, ids


def test_a_copied_or_moved_home_keeps_its_models(tmp_path, tiny_base, tiny_delta):
    home, alice, _, ids = installed_home(tmp_path, tiny_base, tiny_delta)
    targets = {"copytree": tmp_path / "copytree", "cp -a": tmp_path / "cp-a", "moved": tmp_path / "moved"}
    shutil.copytree(home, targets["copytree"], symlinks=True)
    subprocess.run(["cp", "-a", str(home), str(targets["cp -a"])], check=True, timeout=60)
    home.rename(targets["moved"])
    for how, h in targets.items():
        settings = load_settings(home=str(h), base=str(tiny_base))
        with Store(h) as store:
            assert recover(store, settings) == [], how
            models = store.models(alice.id)
            assert [m["id"] for m in models] == ids[::-1] and models[0]["active"], how
            for m in models:  # found in this home, complete
                assert Path(m["path"]).parent == (h / "models" / alice.id).resolve(), how
                load_delta(m["path"])
            assert store.query("SELECT path FROM models WHERE id = ?", (ids[0],)) == [(f"models/{alice.id}/{ids[0]}",)]
            install(store, settings, make(store, alice, tiny_delta, 3)[0])  # and the copy goes on by itself
            assert recover(store, settings) == [] and len(store.models(alice.id)) == 3, how


def test_a_copied_home_serves_its_personal_model(tmp_path, tiny_base, tiny_delta):
    home, alice, token, ids = installed_home(tmp_path, tiny_base, tiny_delta, versions=(1,))
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(home), str(copy)], check=True, timeout=60)
    shutil.rmtree(home)  # the copy stands alone
    srv = ProcessServer(copy, "--base", str(tiny_base)).start()
    try:
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(srv.url + "/v1/chat/completions", headers=auth, timeout=60,
                       json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        conv = r.json()["ownlm"]["conversation_id"]
        stored = httpx.get(f"{srv.url}/api/personalization/conversations/{conv}", headers=auth, timeout=30).json()
        assert stored["messages"][-1]["model"] == ids[0]  # answered by the personal model, not the base
        listed = httpx.get(srv.url + "/api/personalization/models", headers=auth, timeout=30).json()
        assert listed["active"] == ids[0] and listed["models"][0]["signature_verified"]
    finally:
        srv.stop()
    assert (copy / "models" / alice.id / ids[0] / TENSORS).is_file()


def test_recover_removes_leftovers_and_keeps_complete_models(tmp_path, tiny_base, tiny_delta, caplog):
    home, alice, _, ids = installed_home(tmp_path, tiny_base, tiny_delta, versions=(1,))
    settings = load_settings(home=str(home), base=str(tiny_base))
    backup = tmp_path / "store.db.backup"
    with Store(home) as store:
        store.scrub()  # the WAL folded in: store.db alone is the backup
        shutil.copy2(home / "store.db", backup)
        v2, v3 = (install(store, settings, make(store, alice, tiny_delta, v)[0]).model_id for v in (2, 3))
    root = home / "models" / alice.id
    with open(root / v3 / TENSORS, "r+b") as f:  # a torn copy of v3
        f.truncate(100)
    (root / ".tmp-pm_2026_01_01_00_00_v9-abcd").mkdir()
    (root / ".tmp-pm_2026_01_01_00_00_v9-abcd" / TENSORS).write_bytes(b"half")
    # the store restored from the backup (it knows v1 only); models/ is newer
    for f in home.glob("store.db*"):
        f.unlink()
    shutil.copy2(backup, home / "store.db")
    with Store(home) as store:
        removed = recover(store, settings)
        assert sorted(p.name for p in removed) == [".tmp-pm_2026_01_01_00_00_v9-abcd", v3]
        assert (root / v2 / TENSORS).is_file() and (root / ids[0] / TENSORS).is_file()  # complete: never deleted
        assert f"kept {root / v2}" in caplog.text
        assert store.active_model(alice.id)["id"] == ids[0]
        # deploying v2 again puts it back in the registry (the kept directory is replaced)
        assert install(store, settings, make(store, alice, tiny_delta, 2)[0]).model_id == v2
        load_delta(store.active_model(alice.id)["path"])


def test_old_rows_become_relative_and_old_trust_binds_to_the_only_user(tmp_path, tiny_base, tiny_delta):
    home, alice, _, ids = installed_home(tmp_path, tiny_base, tiny_delta, versions=(1,))
    trainer = generate()
    with Store(home) as store:  # the rows as the code before the migrations wrote them
        with store.tx() as db:
            db.execute("UPDATE models SET path = ?", (f"/elsewhere/old-home/models/{alice.id}/{ids[0]}",))
            db.execute("DROP TABLE trusted_signer_users")
            db.execute("INSERT INTO trusted_signers (key_id, alg, public_pem, label, added_at) VALUES (?, 'ed25519', ?, 'old', 0)",
                       (key_id(trainer), public_pem(trainer)))
            db.execute("DELETE FROM _migrations WHERE name IN ('m006_model_paths_relative', 'm007_signer_users')")
    with Store(home) as store:
        assert {"m006_model_paths_relative", "m007_signer_users"} <= set(store.migrations_applied)
        assert store.query("SELECT path FROM models") == [(f"models/{alice.id}/{ids[0]}",)]
        assert key_id(trainer) in store.signers_for(alice.id)
        load_delta(store.active_model(alice.id)["path"])
        bram = store.create_user("bram")
        assert key_id(trainer) not in store.signers_for(bram.id)  # bound to alice, who was the only user


# --- item 3: ids that are paths, and signers bound to users ----------------------------------------------------

def forge(store, tiny_delta, key, edit, user="alice"):
    """A bundle made like make_bundle's, but with `edit(manifest)` applied before it is signed by `key`."""
    d = tiny_delta / "delta"
    files = {TENSORS: (d / TENSORS).read_bytes(), METADATA: (d / METADATA).read_bytes()}
    meta = read_metadata(d)
    manifest = build_manifest(user=user, base_name="tiny", base_sha256=meta["base_sha256"], files=files,
                              delta_meta=meta, training={}, merkle_root="", version=1, previous=None,
                              created_at=1_790_000_000)
    edit(manifest)
    return seal({MANIFEST: canonical(sign_manifest(manifest, key)), **files}, store.node_key().public_json())


BAD_FIELDS = {
    "id ../../../victim": lambda m, victim: m["model"].update(id="../../../victim"),
    "id in a subdir": lambda m, victim: m["model"].update(id="pm_2026_09_22_00_00_v1/../../../../victim"),
    "id absolute": lambda m, victim: m["model"].update(id=str(victim)),
    "id empty": lambda m, victim: m["model"].update(id=""),
    "id a number": lambda m, victim: m["model"].update(id=7),
    "id a temp dir": lambda m, victim: m["model"].update(id=".tmp-x"),
    "version 2**70": lambda m, victim: m["versioning"].update(version=2**70),
    "version true": lambda m, victim: m["versioning"].update(version=True),
    "previous a path": lambda m, victim: m["versioning"].update(previous="../../x"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_a_signed_bundle_whose_fields_are_paths_or_out_of_range_writes_nothing(node, tiny_delta, tmp_path, case):
    settings, store, alice = node
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not yours")
    bundle = forge(store, tiny_delta, store.signing_key(alice.id), lambda m: BAD_FIELDS[case](m, victim))
    before = tree(tmp_path)
    with pytest.raises(CorruptArtifact, match="manifest's"):
        install(store, settings, bundle)
    assert tree(tmp_path) == before  # nothing written, moved or deleted, inside the home or out
    assert store.models(alice.id) == []


def test_a_users_own_key_signs_only_for_that_user(node, tiny_delta):
    settings, store, alice = node
    bram = store.create_user("bram")
    tokens = {"alice": store.create_token(alice.id), "bram": store.create_token(bram.id)}
    forged, _ = make(store, bram, tiny_delta, 1, key=store.signing_key(alice.id))
    with pytest.raises(AuthError, match="may not sign for bram"):
        install(store, settings, forged)
    with ThreadServer(create_app(settings, store, None)) as srv:
        for who in ("bram", "alice"):
            r = httpx.post(srv.url + "/api/personalization/deploy", content=forged,
                           headers={"Authorization": f"Bearer {tokens[who]}"}, timeout=60)
            assert r.status_code == 401, (who, r.text)
    assert store.models(bram.id) == [] and not (settings.home / "models" / bram.id).exists()
    assert install(store, settings, make(store, bram, tiny_delta, 1)[0]).user_id == bram.id  # bram's own key


def test_a_trainer_key_trusted_for_bram_signs_for_bram_not_for_alice(node, tiny_delta, tmp_path, tiny_base):
    settings, store, alice = node
    bram = store.create_user("bram")
    trainer = generate()
    pem = tmp_path / "trainer.pem"
    pem.write_text(public_pem(trainer))
    store.signing_key(alice.id)  # alice's own key exists (and signs for her alone)
    r = run_cli("trust", "add", str(pem), "--for-user", "bram", "--label", "gpu box", env={"OWNLM_BASE": str(tiny_base)})
    assert r.returncode == 0 and f"trusted {key_id(trainer)} for bram" in r.stdout, r.stderr
    listing = run_cli("trust", "list").stdout
    assert "gpu box" in listing and "bram" in listing and "alice" in listing  # alice: her own key
    assert install(store, settings, make(store, bram, tiny_delta, 1, key=trainer)[0]).signer == key_id(trainer)
    with pytest.raises(AuthError, match="may not sign for alice"):
        install(store, settings, make(store, alice, tiny_delta, 1, key=trainer)[0])
    with pytest.raises(SignatureError, match="does not trust"):  # a key nobody trusted
        install(store, settings, make(store, alice, tiny_delta, 1, key=generate())[0])
    assert store.models(alice.id) == [] and [m["signer"] for m in store.models(bram.id)] == [key_id(trainer)]


# --- item 4: the right to delete reaches the models -------------------------------------------------------------

def capture(store, user, tag: str, n: int, at: float) -> list[str]:
    """n two-turn conversations created at unix time `at`; their ids."""
    return [store.capture(user.id, [NewMessage("user", f"{tag} question {i}: {MARKER}", created_at=at),
                                    NewMessage("assistant", f"{tag} answer {i}", created_at=at)],
                          source="api", seed=f"{tag}{i}").conversation_id for i in range(n)]


def round_from_store(store, settings, user, tiny_delta, version):
    """What a round deploys, minus the training: a dataset built from the store's conversations now and saved,
    and a bundle whose signed manifest names its Merkle root (that, not the weights, links a model to its data).
    Returns (model id, bundle)."""
    conversations, feedback = store.training_view(user.id)
    cfg = DatasetConfig(min_examples=1, heldout_fraction=0.0)
    built = build(conversations, feedback, load_tokenizer(settings), cfg)
    ds = store.save_dataset(user.id, built, config_dict(cfg))
    report = {**json.loads((tiny_delta / "report.json").read_text()), "dataset": {"id": ds, "merkle_root": built.merkle_root}}
    data, _ = make_bundle(delta_dir=tiny_delta / "delta", report=report, user_name=user.name,
                          signing_key=store.signing_key(user.id), recipient=store.node_key().public_json(),
                          base_name="tiny", version=version, previous=None, created_at=1_790_000_000 + version * 3600)
    return install(store, settings, data).model_id, data


@pytest.fixture
def two_rounds(node, tiny_delta):
    """alice: conversations A (t=1000) → model v1; then B (t=3000) → model v2 (trained on A and B), active."""
    settings, store, alice = node
    a = capture(store, alice, "A", 3, 1000.0)
    v1, _ = round_from_store(store, settings, alice, tiny_delta, 1)
    b = capture(store, alice, "B", 3, 3000.0)
    v2, bundle2 = round_from_store(store, settings, alice, tiny_delta, 2)
    assert store.active_model(alice.id)["id"] == v2
    return settings, store, alice, a, b, v1, v2, bundle2


def gone(home, user, model_id) -> bool:
    return not (home / "models" / user.id / model_id).exists() and model_files(home, model_id) == []


def test_deleting_a_conversation_removes_the_models_trained_on_it(two_rounds, tiny_delta):
    settings, store, alice, a, b, v1, v2, _ = two_rounds
    home = settings.home
    assert store.delete_preview(alice.id, conversation_id=b[0])["models"] == [v2]
    res = store.delete_data(alice.id, conversation_id=b[0])
    assert res["models_removed"] == [v2] and res["models_kept"] == [] and res["active_model"] == v1
    assert store.active_model(alice.id)["id"] == v1 and [m["id"] for m in store.models(alice.id)] == [v1]
    assert gone(home, alice, v2) and (home / "models" / alice.id / v1 / TENSORS).is_file()
    # a model this node has no dataset for is not tied to the deleted data: kept, and said so
    other = install(store, settings, make(store, alice, tiny_delta, 3)[0]).model_id
    res = store.delete_data(alice.id, conversation_id=a[0])
    assert res["models_removed"] == [v1] and res["models_unlinked"] == [other] and res["active_model"] == other
    assert gone(home, alice, v1)
    events = [e for e in store.audit_log(alice.id) if e["action"] == "model_deleted"]
    assert {e["detail"]["model"] for e in events} == {v1, v2} and MARKER not in str(store.audit_log(alice.id))


@pytest.mark.parametrize("scope", ["before", "all"])
def test_deleting_before_a_date_or_everything_removes_every_model_trained_on_it(two_rounds, scope):
    settings, store, alice, a, b, v1, v2, _ = two_rounds
    kw = {"before": 2000.0} if scope == "before" else {}
    assert store.delete_preview(alice.id, **kw)["models"] == [v2, v1]  # v2 learned A too
    res = store.delete_data(alice.id, **kw)
    assert res["models_removed"] == [v2, v1] and res["active_model"] is None
    assert store.active_model(alice.id) is None and store.models(alice.id) == []
    assert gone(settings.home, alice, v1) and gone(settings.home, alice, v2)
    assert [d for d in (settings.home / "models" / alice.id).iterdir()] == []


def test_keep_models_keeps_them_and_says_so(two_rounds):
    settings, store, alice, a, b, v1, v2, _ = two_rounds
    res = store.delete_data(alice.id, conversation_id=b[0], keep_models=True)
    assert res["models_kept"] == [v2] and res["models_removed"] == [] and res["active_model"] == v2
    assert store.active_model(alice.id)["id"] == v2 and (settings.home / "models" / alice.id / v2 / TENSORS).is_file()
    assert next(e for e in store.audit_log(alice.id) if e["action"] == "deleted")["detail"]["models_kept"] == [v2]
    # the CLI says what it removes (and, without --keep-models, removes it)
    r = run_cli("delete", "--user", "alice", "--conversation", b[1], "--yes")
    assert r.returncode == 0, r.stderr
    assert f"removed the models trained on them: {v2}" in r.stdout and f"now serving {v1}" in r.stdout
    r = run_cli("delete", "--user", "alice", "--conversation", a[1], "--yes", "--keep-models")
    assert r.returncode == 0 and f"kept, as asked, the models trained on them: {v1}" in r.stdout, r.stderr
    assert [m["id"] for m in store.models(alice.id)] == [v1]


def test_a_model_trained_on_deleted_data_is_not_installed_after_the_delete(two_rounds, tiny_delta):
    settings, store, alice, a, b, v1, v2, bundle2 = two_rounds
    store.delete_data(alice.id, conversation_id=b[0])
    before = tree(settings.home / "models")
    with pytest.raises(TrainedOnDeletedData):  # a replay of the removed model, even as an explicit rollback
        install(store, settings, bundle2, rollback=True)
    assert tree(settings.home / "models") == before and store.active_model(alice.id)["id"] == v1
    v3, _ = round_from_store(store, settings, alice, tiny_delta, 3)  # a new round on what remains is fine
    assert store.active_model(alice.id)["id"] == v3


def test_a_delete_killed_before_the_files_went_is_finished_by_recover(two_rounds, monkeypatch):
    settings, store, alice, a, b, v1, v2, _ = two_rounds

    def killed(*args):  # the process dies right after the delete's COMMIT
        raise KeyboardInterrupt

    monkeypatch.setattr(type(store), "remove_model_files", killed)
    with pytest.raises(KeyboardInterrupt):
        store.delete_data(alice.id, conversation_id=b[0])
    monkeypatch.undo()
    assert (settings.home / "models" / alice.id / v2 / TENSORS).is_file()  # complete, unregistered
    assert [p.name for p in recover(store, settings)] == [v2] and gone(settings.home, alice, v2)


def test_delete_over_http_removes_the_model_and_the_base_answers(node, tiny_delta, tiny_base, home):
    from ownlm.basemodel import load_base
    from ownlm.engine.personal import PersonalEngine

    settings, store, alice = node
    token = store.create_token(alice.id)
    engine = PersonalEngine(load_base(load_settings(base=str(tiny_base), device="cpu")), store)
    with ThreadServer(create_app(settings, store, engine)) as srv:
        client = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        for i in range(3):
            r = client.post("/api/personalization/interactions", json={"conversation_id": f"c{i}", "messages": [
                {"role": "user", "content": f"tell me {i} {MARKER}"}, {"role": "assistant", "content": f"sure {i}"}]})
            assert r.status_code == 200
        v1, _ = round_from_store(store, settings, alice, tiny_delta, 1)
        engine.refresh(alice.id)

        def answered_by() -> str:
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200, r.text
            cid = r.json()["ownlm"]["conversation_id"]
            return client.get(f"/api/personalization/conversations/{cid}").json()["messages"][-1]["model"]

        assert answered_by() == v1
        convs = [c["id"] for c in client.get("/api/personalization/conversations").json()["conversations"]]
        kept = client.delete("/api/personalization/data", params={"conversation_id": convs[-1], "keep_models": "true"})
        assert kept.status_code == 200 and kept.json()["deleted"]["models_kept"] == [v1]
        assert answered_by() == v1
        assert client.get("/api/personalization/delete-preview").json()["would_delete"]["models"] == [v1]
        r = client.delete("/api/personalization/data")
        assert r.status_code == 200, r.text
        assert r.json()["deleted"]["models_removed"] == [v1] and r.json()["deleted"]["active_model"] is None
        assert answered_by() == engine.base_name  # the running node stopped serving it at once
        assert client.get("/api/personalization/models").json() == {"models": [], "active": None}
    # residue: nothing of the model under models/, no plaintext of the deleted data in any file
    assert gone(home, alice, v1)
    for f in home.rglob("*"):
        if f.is_file():
            assert MARKER.encode() not in f.read_bytes(), f
    # ...nor for whoever holds the key: no table (the memory index and its FTS5 shadow tables included) and no
    # decrypted page of the store or its WAL, free pages included
    assert store.recall(alice.id, MARKER) == []  # (the "hi" asked after the delete is the only passage left)
    for (name,) in store.query("SELECT name FROM sqlite_master WHERE type = 'table'"):
        assert MARKER not in str(store.query(f'SELECT * FROM "{name}"')), name
    for page in decrypted_pages(home / "store.db", (home / "store.key").read_bytes()):
        assert MARKER.encode() not in page


def test_the_memory_index_held_the_data_before_the_delete(node):
    """The residue check above is not vacuous for the memory index: captured text is indexed (and findable)."""
    settings, store, alice = node
    store.capture(alice.id, [NewMessage("user", f"tell me 0 {MARKER}"), NewMessage("assistant", "sure 0")],
                  source="interactions", seed="client:c0")
    assert [p.question for p in store.recall(alice.id, MARKER)] == [f"tell me 0 {MARKER}"]
    assert any(MARKER.encode() in p for p in decrypted_pages(settings.home / "store.db", (settings.home / "store.key").read_bytes()))
