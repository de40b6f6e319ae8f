"""A new user's first hour on the command line: whose data a command acts on, `ownlm chat` with the personal
model (and what it stores), and `ownlm models` on an 80-column terminal. Real `ownlm` processes on a real
SQLCipher home."""

from __future__ import annotations

import re

import pytest

from ownlm.store import Store
from tests.conftest import run_cli


def make_users(home, *names: str) -> None:
    with Store(home) as store:
        for name in names:
            store.create_user(name)


# ---- the home's default user ---------------------------------------------------------------------------

def test_a_homes_only_user_is_whom_commands_act_for(home):
    make_users(home, "bram")  # what `make demo` leaves: one user, not called 'me'
    status = run_cli("status")
    assert status.returncode == 0, status.stderr
    assert "user bram" in status.stdout
    models = run_cli("models")
    assert models.returncode == 0, models.stderr
    assert "no personal model installed" in models.stdout


def test_several_users_ask_which_one_and_name_the_flag(home):
    make_users(home, "alice", "bob")
    r = run_cli("status")
    assert r.returncode == 1
    line = r.stderr.strip()
    assert line.count("\n") == 0 and "alice" in line and "bob" in line and "--user NAME" in line
    for how in (["status", "--user", "bob"],):
        ok = run_cli(*how)
        assert ok.returncode == 0 and "user bob" in ok.stdout, ok.stderr
    assert "user alice" in run_cli("status", env={"OWNLM_USER": "alice"}).stdout
    (home / "settings.toml").write_text('user = "bob"\n')  # the home's own default
    assert "user bob" in run_cli("status").stdout


def test_a_missing_user_lists_the_homes_users(home):
    make_users(home, "bram")
    r = run_cli("status", "--user", "me")
    assert r.returncode == 1
    assert "no user 'me'" in r.stderr and "bram" in r.stderr and "--user" in r.stderr
    empty = run_cli("status", env={"OWNLM_HOME": str(home.parent / "empty")})
    assert empty.returncode == 1 and "no users" in empty.stderr and "ownlm import" in empty.stderr


def test_every_command_on_a_users_data_takes_user():
    from click.testing import CliRunner

    from ownlm.cli import cli

    runner = CliRunner()
    for path in (["chat"], ["status"], ["models"], ["rollback"], ["import"], ["delete"], ["train"], ["eval"],
                 ["bundle"], ["dataset", "build"], ["dataset", "list"], ["audit", "log"], ["audit", "prove"],
                 ["privacy", "show"], ["privacy", "set"], ["keys", "public"]):
        help_text = runner.invoke(cli, [*path, "--help"]).output
        assert "--user" in help_text, path
        assert re.search(r"--user\s+NAME\s+.*only\s+user", help_text), path


# ---- ownlm chat: the personal model, and what it stores ------------------------------------------------

@pytest.fixture
def alice_with_model(home, tiny_base, tiny_delta):
    """A home whose only user, alice, has a personal model (v1) installed from the tiny delta."""
    from ownlm.settings import load_settings
    from tests.test_personal_engine import deploy

    settings = load_settings(base=str(tiny_base), device="cpu")
    with Store(home) as store:
        alice = store.create_user("alice")
        model_id = deploy(store, settings, alice, tiny_delta, 1)
    return alice, model_id


def stored_chats(home, user_id):
    with Store(home) as store:
        return [(c, store.get_messages(user_id, c["id"])) for c in store.list_conversations(user_id)]


def test_chat_answers_with_the_personal_model_and_stores_the_exchange(home, tiny_base, alice_with_model):
    alice, model_id = alice_with_model
    r = run_cli("chat", "--base", str(tiny_base), "--device", "cpu", "--max-tokens", "5", "--temperature", "0", "hello")
    assert r.returncode == 0, r.stderr
    ((conv, msgs),) = stored_chats(home, alice.id)
    assert conv["source"] == "cli"
    assert [(m["role"], m["model"]) for m in msgs] == [("user", None), ("assistant", model_id)]
    assert msgs[0]["content"] == "hello" and r.stdout == msgs[1]["content"] + "\n"


def test_chat_base_model_compares_with_the_base(home, tiny_base, alice_with_model):
    from ownlm.basemodel import resolve_base

    alice, model_id = alice_with_model
    args = ("chat", "--base", str(tiny_base), "--device", "cpu", "--max-tokens", "5", "--temperature", "0", "hello")
    base = run_cli(*args, "--base-model")
    assert base.returncode == 0, base.stderr
    assert run_cli(*args).returncode == 0
    chats = stored_chats(home, alice.id)
    models = sorted(msgs[1]["model"] for _, msgs in chats)
    assert models == sorted([model_id, resolve_base(str(tiny_base)).name])  # two one-shot chats, two conversations


def test_an_interactive_session_is_one_conversation(home, tiny_base, alice_with_model):
    alice, model_id = alice_with_model
    args = ("chat", "--base", str(tiny_base), "--device", "cpu", "--max-tokens", "3", "--temperature", "0")
    first = run_cli(*args, "--system", "Be brief.", input="hello\nhow are you?\n\n")
    assert first.returncode == 0, first.stderr
    assert "alice" in first.stderr and model_id in first.stderr  # who is chatting, with which model
    ((conv, msgs),) = stored_chats(home, alice.id)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in msgs if m["role"] == "user"] == ["hello", "how are you?"]
    assert msgs[3]["parent_id"] == msgs[2]["id"] and {m["model"] for m in msgs[2::2]} == {model_id}
    # a second session that opens the same way is a second conversation, not a continuation of the first
    second = run_cli(*args, "--system", "Be brief.", input="hello\n\n")
    assert second.returncode == 0, second.stderr
    assert len(stored_chats(home, alice.id)) == 2


# ---- ownlm models on an 80-column terminal -------------------------------------------------------------

def test_models_never_cuts_an_id_at_80_columns(home, alice_with_model):
    alice, model_id = alice_with_model
    for columns in ("80", "60"):
        r = run_cli("models", env={"COLUMNS": columns})
        assert r.returncode == 0, r.stderr
        assert model_id in r.stdout, r.stdout  # whole, on one line: it can be copied into `ownlm models show`
        assert max(len(line) for line in r.stdout.splitlines()) <= int(columns)
