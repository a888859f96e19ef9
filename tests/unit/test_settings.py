import pytest

from controller.errors import ConfigError
from controller.settings import load_settings

GOOD = """
[server]
bind = "127.0.0.1:8080"
[database]
url = "sqlite:///./maintctl.db"
[[hosts]]
name = "local"
uri = "qemu:///system"
update_domain = 0
[runbooks.sleep]
argv = ["sleep", "{seconds}"]
timeout_seconds = 20
[runbooks.sleep.params]
seconds = "^[0-9]{1,2}$"
"""


def write(tmp_path, text):
    path = tmp_path / "maintctl.toml"
    path.write_text(text)
    return path


def test_the_documented_shape_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("MAINTCTL_DATABASE_URL", raising=False)
    s = load_settings(write(tmp_path, GOOD))
    assert s.server.port == 8080 and s.server.auth is True
    assert s.hosts[0].name == "local" and s.hosts[0].patch_via == "local"
    assert s.runbooks["sleep"].params == {"seconds": "^[0-9]{1,2}$"}
    assert s.maintenance.pause_budget_cap_seconds == 30


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MAINTCTL_DATABASE_URL", "postgresql+psycopg://u:p@h/db")
    monkeypatch.setenv("MAINTCTL_SERVER_BIND", "127.0.0.1:9999")
    s = load_settings(write(tmp_path, GOOD))
    assert s.database.url == "postgresql+psycopg://u:p@h/db"
    assert s.server.bind == "127.0.0.1:9999"


def test_config_env_var_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MAINTCTL_CONFIG", str(write(tmp_path, GOOD)))
    assert load_settings().hosts[0].uri == "qemu:///system"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace('uri = "qemu:///system"', ""), "hosts.0.uri: Field required"),
        (
            GOOD.replace("update_domain = 0", "update_domian = 0"),
            "hosts.0.update_domian: unknown key",
        ),
        (GOOD.replace('"^[0-9]{1,2}$"', '"[0-9"'), "is not a valid regex"),
        (
            GOOD.replace("timeout_seconds = 20", "timeout_seconds = -1"),
            "runbooks.sleep.timeout_seconds",
        ),
        (GOOD + "\n[server\n", "is not valid TOML"),
        (
            GOOD.replace('bind = "127.0.0.1:8080"', 'bind = "0.0.0.0:80"\nauth = false'),
            "auth = false is refused on the non-loopback bind 0.0.0.0:80",
        ),
        (
            GOOD.replace('["sleep", "{seconds}"]', '["sleep", "{secs}"]'),
            "undeclared parameters: secs",
        ),
    ],
)
def test_bad_config_is_one_readable_paragraph(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message.strip() and "Traceback" not in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_the_shipped_example_config_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "deploy" / "maintctl.toml.example"
    s = load_settings(example)
    assert s.runbooks["apt-upgrade"].argv[0] == "/usr/bin/apt-get"
    assert s.maintenance.guardian is True and s.server.auth is True
