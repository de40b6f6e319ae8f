"""Importing every export fixture into the real encrypted store: right counts, idempotent re-imports."""

import pytest

from ownlm.capture.importers import parse_file
from ownlm.store.imports import import_into
from ownlm.store import Store
from tests.conftest import run_cli
from tests.test_importers import CASES, EXPORTS


@pytest.fixture
def store(home):
    s = Store(home)
    yield s
    s.close()


@pytest.mark.parametrize("rel, fmt, n_conv, n_msg, skipped, n_bad", CASES, ids=[c[0] for c in CASES])
def test_import_counts_and_idempotency(store, rel, fmt, n_conv, n_msg, skipped, n_bad):
    user = store.get_or_create_user("me")
    result = parse_file(EXPORTS / rel)
    first = import_into(store, user.id, result, rel)
    assert first["messages_new"] == n_msg
    assert first["conversations_new"] == n_conv
    assert store.stats(user.id)["messages"] == n_msg
    again = import_into(store, user.id, parse_file(EXPORTS / rel), rel)
    assert again == {"conversations_new": 0, "conversations_known": n_conv, "messages_new": 0, "messages_duplicate": n_msg}
    assert store.stats(user.id) == {"conversations": n_conv, "messages": n_msg, "feedback": 0}
    imports = [e for e in store.audit_log(user.id) if e["action"] == "imported"]
    assert len(imports) == 2 and imports[0]["detail"]["bad"] == n_bad


def test_cli_import_twice_and_summary(home):
    path = EXPORTS / "chatgpt/librechat-chatgpt-modern-export.json"
    first = run_cli("import", str(path))
    assert first.returncode == 0, first.stderr
    assert "2 new" in first.stdout and "6 new" in first.stdout
    assert "not imported" in first.stdout and "no `mapping`" in first.stdout
    second = run_cli("import", str(path))
    assert second.returncode == 0 and "0 new, 2 already stored" in second.stdout and "6 duplicates" in second.stdout


def test_cli_import_bad_files_are_one_line(home, tmp_path):
    truncated = tmp_path / "conversations.json"
    truncated.write_bytes((EXPORTS / "chatgpt/librechat-chatgpt-export.json").read_bytes()[:500])
    for args in (["import", str(truncated)], ["import", str(tmp_path / "missing.json")], ["import", "--format", "nope", str(truncated)]):
        r = run_cli(*args)
        assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    # nothing was stored by the failed imports, and the store still opens
    with Store(home) as s:
        assert all(s.stats(u.id)["messages"] == 0 for u in s.list_users())


def test_cli_delete_and_passphrase(home):
    path = EXPORTS / "sharegpt/axolotl-conversation.json"
    assert run_cli("import", str(path)).returncode == 0
    r = run_cli("delete", "--all", input="n\n")
    assert r.returncode != 0 and "12 messages" in r.stdout  # shows what would go, then aborts
    with Store(home) as s:
        assert s.stats(s.get_user("me").id)["messages"] == 12
    r = run_cli("delete", "--before", "yesterday", "--yes")
    assert r.returncode == 1 and "--before" in r.stderr
    r = run_cli("delete", "--all", "--yes")
    assert r.returncode == 0 and "deleted 12 messages" in r.stdout
    # a passphrase set through the CLI is then required
    with Store(home) as s:
        s.protect_key("a long passphrase")
    r = run_cli("import", str(path), env={"OWNLM_PASSPHRASE": "wrong one!"})
    assert r.returncode == 1 and "passphrase" in r.stderr
    r = run_cli("import", str(path), env={"OWNLM_PASSPHRASE": "a long passphrase"})
    assert r.returncode == 0, r.stderr


def test_zip_exports_import_from_the_cli_and_the_api(home, tmp_path):
    """A ChatGPT or Claude export as downloaded (.zip), through `ownlm import` and POST /api/personalization/import."""
    import httpx

    from ownlm.api.app import create_app
    from ownlm.settings import load_settings
    from tests.servers import ThreadServer
    from tests.test_importers import make_zip

    chatgpt = make_zip(tmp_path / "chatgpt-export.zip", {
        "conversations.json": (EXPORTS / "chatgpt/librechat-chatgpt-export.json").read_bytes(),
        "chat.html": b"<html></html>", "user.json": b"{}"})
    r = run_cli("import", str(chatgpt))
    assert r.returncode == 0, r.stderr
    assert "chatgpt" in r.stdout and "2 new" in r.stdout and "10 new" in r.stdout
    claude = make_zip(tmp_path / "claude-export.zip", {
        "data/conversations.json": (EXPORTS / "claude/claude-to-sqlite-example.json").read_bytes(),
        "data/users.json": b"[]", "data/projects.json": b"[]"})
    photos = make_zip(tmp_path / "photos.zip", {"notes.txt": b"hi", "photo.jpg": b"\xff\xd8\xff"})
    huge = make_zip(tmp_path / "huge.zip", {"conversations.json": b"[" + b" " * (3 << 20) + b"]"})  # ~3 KB packed
    settings = load_settings(max_body_bytes=64 * 1024)  # an upload may unpack to 32x that: 2 MiB
    with Store(home) as store:
        token = store.create_token(store.get_user("me").id)
        with ThreadServer(create_app(settings, store, None)) as server:
            client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
            ok = client.post("/api/personalization/import",
                             files={"file": ("claude-export.zip", claude.read_bytes(), "application/zip")})
            assert ok.status_code == 200, ok.text
            body = ok.json()
            assert body["format"] == "claude" and body["conversations_new"] == body["conversations"] > 0
            refused = client.post("/api/personalization/import",
                                  files={"file": ("photos.zip", photos.read_bytes(), "application/zip")})
            assert refused.status_code == 422
            message = refused.json()["error"]["message"]
            assert message.startswith("photos.zip is a zip archive without a chat export")
            assert "notes.txt" in message and "photo.jpg" in message and "ownlm-import-" not in message
            too_big = client.post("/api/personalization/import",
                                  files={"file": ("huge.zip", huge.read_bytes(), "application/zip")})
            assert too_big.status_code == 413 and "over the 2 MiB" in too_big.json()["error"]["message"]
