"""Settings: environment + flags (flags win, unset flags fall through), validation errors."""

import pytest

from helora.shared.errors import ConfigError
from helora.shared.settings import DEFAULT_AMQP_URL, load_settings


def test_defaults_and_secret_url():
    s = load_settings()
    assert s.amqp_url.get_secret_value() == DEFAULT_AMQP_URL
    assert "guest" not in repr(s)
    assert s.aggregator.buffer_size == 4 and s.aggregator.padding == "zero"


def test_env_nested_and_flags_override(monkeypatch):
    monkeypatch.setenv("HELORA_AGGREGATOR__BUFFER_SIZE", "7")
    monkeypatch.setenv("HELORA_AGGREGATOR__SERVER_LR", "0.5")
    monkeypatch.setenv("HELORA_FEDERATION", "fromenv")
    s = load_settings(aggregator={"buffer_size": 2, "padding": None}, federation=None)
    assert s.aggregator.buffer_size == 2  # flag wins
    assert s.aggregator.server_lr == 0.5  # env kept for unset flags
    assert s.federation == "fromenv"


@pytest.mark.parametrize(
    "overrides",
    [
        {"federation": "bad name!"},
        {"aggregator": {"buffer_size": 0}},
        {"aggregator": {"padding": "sideways"}},
        {"worker": {"client_id": "a/b"}},
        {"worker": {"slowness": 0.5}},
        {"model": {"max_rank": 0}},
        {"no_such_setting": 1},
    ],
)
def test_invalid_settings_raise_config_error(overrides):
    with pytest.raises(ConfigError):
        load_settings(**overrides)


def test_toml_config_file_below_env_and_flags(monkeypatch, tmp_path):
    cfg = tmp_path / "helora.toml"
    cfg.write_text('federation = "fromfile"\n[aggregator]\nbuffer_size = 9\nserver_lr = 0.25\n')
    monkeypatch.setenv("HELORA_CONFIG", str(cfg))
    monkeypatch.setenv("HELORA_AGGREGATOR__SERVER_LR", "0.5")
    s = load_settings(aggregator={"buffer_size": 3})
    assert s.federation == "fromfile"  # from the file
    assert s.aggregator.server_lr == 0.5  # env beats file
    assert s.aggregator.buffer_size == 3  # flag beats both


def test_missing_or_bad_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv("HELORA_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError):
        load_settings()
    bad = tmp_path / "bad.toml"
    bad.write_text("[aggregator]\nbuffer_size = 'many'\n")
    monkeypatch.setenv("HELORA_CONFIG", str(bad))
    with pytest.raises(ConfigError):
        load_settings()
