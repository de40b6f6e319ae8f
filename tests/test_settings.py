from pathlib import Path

import pytest

from ownlm.errors import ConfigError
from ownlm.settings import SETTINGS_FILE, Settings, default_home, load_settings


def test_defaults(home):
    s = load_settings()
    assert s.home == home.resolve()
    assert s.base == "embedded" and s.device == "auto" and s.host == "127.0.0.1"


def test_default_home_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OWNLM_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "xdg" / "ownlm"


def test_priority_flag_over_env_over_file(home, monkeypatch):
    home.mkdir(parents=True)
    (home / SETTINGS_FILE).write_text('base = "/from/file"\nport = 9000\ndevice = "cpu"\n')
    monkeypatch.setenv("OWNLM_PORT", "9001")
    s = load_settings(device=None, base="/from/flag")
    assert s.base == "/from/flag"  # flag beats file
    assert s.port == 9001  # env beats file
    assert s.device == "cpu"  # file beats default


def test_home_flag_selects_settings_file(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / SETTINGS_FILE).write_text("port = 1234\n")
    assert load_settings(home=str(other)).port == 1234


@pytest.mark.parametrize(
    "overrides, field",
    [({"port": 0}, "port"), ({"device": "tpu"}, "device"), ({"threads": 0}, "threads"), ({"base": "  "}, "base")],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_settings(**overrides)
    assert f"'{field}'" in e.value.message
    assert f"--{field}" in e.value.hint


def test_unknown_key_in_file_is_an_error(home):
    home.mkdir(parents=True)
    (home / SETTINGS_FILE).write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="colour"):
        load_settings()


def test_malformed_file_is_an_error(home):
    home.mkdir(parents=True)
    (home / SETTINGS_FILE).write_text("port = = 3\n")
    with pytest.raises(ConfigError, match="cannot read settings"):
        load_settings()


def test_every_field_is_documented():
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
