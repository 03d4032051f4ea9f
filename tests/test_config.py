"""Configuration: TOML + environment, validated at start with one clear error."""

import pytest

from ocs.config import ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "ocs.toml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    config = load_config(None, environ={})
    assert config.diameter.port == 3868
    assert config.redis.url is None
    assert config.redis.partitions == 16


def test_file_then_environment(tmp_path):
    path = write(tmp_path, '[diameter]\norigin_host = "ocs1.example.net"\nport = 3870\n')
    config = load_config(path, environ={"OCS_PORT": "3999", "OCS_REDIS__PARTITIONS": "32",
                                        "OCS_REDIS_URL": "redis://10.0.0.1:6379/0"})
    assert config.diameter.origin_host == "ocs1.example.net"
    assert config.diameter.port == 3999
    assert config.redis.partitions == 32
    assert config.redis.url == "redis://10.0.0.1:6379/0"


def test_allowed_peers_list_from_environment():
    config = load_config(None, environ={"OCS_DIAMETER__ALLOWED_PEERS": '["pgw1.test", "10.1.1.1"]'})
    assert config.diameter.allowed_peers == ["pgw1.test", "10.1.1.1"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[diameter]\nport = 70000\n", "diameter.port"),
        ("[diameter]\nport = \"x\"\n", "port"),
        ("[diameter]\nwatchdog_seconds = 1\n", "watchdog_seconds"),
        ("[redis]\npartitions = 0\n", "partitions"),
        ("[redis]\nurl = \"http://x\"\n", "redis.url"),
        ("[diameter]\nbogus = 1\n", "bogus"),
        ("[charging]\nratecard = \"/nonexistent.toml\"\n", "ratecard"),
        ("[diameter\n", "invalid TOML"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert fragment in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_session_and_overload_settings_are_checked():
    from ocs.config import ConfigError, load_config

    config = load_config(None, environ={"OCS_CHARGING__TCC_MAX_SECONDS": "900", "OCS_REDIS__CALL_TIMEOUT_MS": "250",
                                        "OCS_DIAMETER__CC_SESSION_FAILOVER": "false"})
    assert config.charging.tcc_max_seconds == 900 and config.redis.call_timeout_ms == 250
    assert config.diameter.cc_session_failover is False
    for bad in ({"OCS_CHARGING__TCC_MIN_SECONDS": "0"}, {"OCS_CHARGING__TCC_MIN_SECONDS": "20000"},
                {"OCS_REDIS__CALL_TIMEOUT_MS": "0"}, {"OCS_OVERLOAD__NEW_SESSIONS_MAX_IN_FLIGHT": "9000"}):
        with pytest.raises(ConfigError):
            load_config(None, environ=bad)
