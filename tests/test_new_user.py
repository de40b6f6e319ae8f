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
