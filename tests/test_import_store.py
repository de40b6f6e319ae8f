"""Importing every export fixture into the real encrypted store: right counts, idempotent re-imports."""

import pytest

from ownlm.capture.importers import parse_file
from ownlm.capture.ingest import import_into
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
