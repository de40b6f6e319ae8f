import pytest

from tests.conftest import run_cli


def test_help_on_every_command():
    from click.testing import CliRunner

    from ownlm.cli import cli

    runner = CliRunner()
    assert runner.invoke(cli, ["--help"]).exit_code == 0
    for name in cli.commands:
        r = runner.invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, name


def test_missing_base_is_one_line_error(tmp_path):
    r = run_cli("chat", "--base", "/nonexistent", "hi")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "/nonexistent" in lines[0]
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback():
    r = run_cli("--debug", "chat", "--base", "/nonexistent", "hi")
    assert r.returncode != 0 and "Traceback" in r.stderr and "BaseModelNotFound" in r.stderr


def test_bad_setting_is_one_line_error():
    r = run_cli("info", "--no-load", env={"OWNLM_PORT": "70000"})
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "port" in r.stderr


def test_chat_with_tiny_model(tiny_base):
    r = run_cli("chat", "--base", str(tiny_base), "--max-tokens", "5", "--temperature", "0", "hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n")


def test_interactive_chat_loop(tiny_base):
    r = run_cli("chat", "--base", str(tiny_base), "--max-tokens", "3", input="first\nsecond\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 3  # two questions asked, then the empty line ends it


@pytest.mark.slow
def test_info_twice_uses_cache(model_cache_home):
    env = {"OWNLM_HOME": str(model_cache_home)}
    first = run_cli("info", env=env)
    assert first.returncode == 0, first.stderr
    second = run_cli("info", env=env)
    assert second.returncode == 0, second.stderr
    assert "yes (safetensors cache)" in second.stdout
    assert "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in second.stdout


def test_chat_with_memory_names_what_it_drew_on(tiny_base, tmp_path):
    from ownlm.store import Store

    env = {"OWNLM_HOME": str(tmp_path / "home")}
    chat = ("chat", "--base", str(tiny_base), "--max-tokens", "3", "--temperature", "0")
    first = run_cli(*chat, "my sailboat is called Seagull and moors in Harlingen", env=env)
    assert first.returncode == 0, first.stderr
    assert "remembered from" not in first.stderr  # nothing to recall yet (and memory is off by default)
    asked = run_cli(*chat, "--memory", "where does the sailboat Seagull moor?", env=env)
    assert asked.returncode == 0, asked.stderr
    assert "remembered from: " in asked.stderr and "Seagull" in asked.stderr
    off = run_cli(*chat, "--no-memory", "where does the sailboat Seagull moor?", env=env)
    assert off.returncode == 0 and "remembered from" not in off.stderr
    with Store(tmp_path / "home") as store:
        user = store.list_users()[0]
        used = [e for e in store.audit_log(user.id) if e["action"] == "memory_used"]
    assert len(used) == 1 and "Seagull" not in str(used)  # counted once, by count, never the text
