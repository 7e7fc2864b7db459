"""Configuration: precedence, validation, secrets, and the secure default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broadcastd.errors import ConfigError
from broadcastd.settings import Settings, SlowConsumerPolicy, iter_fields, load_settings

from .conftest import ROOT


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
    return subprocess.run(
        [sys.executable, "-m", "broadcastd", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_defaults_are_the_documented_ones() -> None:
    s = Settings()
    assert (s.ws.host, s.ws.port) == ("0.0.0.0", 8765)
    assert (s.control.host, s.control.port) == ("127.0.0.1", 8766)
    assert s.ws.slow_consumer_policy is SlowConsumerPolicy.DISCONNECT
    assert s.ws.compression is False
    assert s.control.token is None


def test_every_setting_has_a_description() -> None:
    for name, info in iter_fields():
        assert info.description, f"{name} has no docstring"


def test_flag_beats_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "b.toml"
    config.write_text(
        "drain_timeout = 3.0\n[ws]\nport = 1001\nmax_clients = 7\noutbox_messages = 9\n"
    )
    monkeypatch.setenv("BROADCASTD_WS__PORT", "1002")
    monkeypatch.setenv("BROADCASTD_WS__MAX_CLIENTS", "8")
    s = load_settings(config, {"ws.port": "1003"})
    assert s.ws.port == 1003  # flag
    assert s.ws.max_clients == 8  # environment over file
    assert s.ws.outbox_messages == 9  # file over default
    assert s.drain_timeout == 3.0
    assert s.ws.ping_interval == 20.0  # default


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "b.toml"
    config.write_text('[log]\nlevel = "debug"\n')
    monkeypatch.setenv("BROADCASTD_CONFIG", str(config))
    assert load_settings().log.level == "debug"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"ws.port": "70000"}, "ws.port"),
        ({"ws.outbox_messages": "0"}, "ws.outbox_messages"),
        ({"ws.slow_consumer_policy": "ignore"}, "ws.slow_consumer_policy"),
        ({"log.level": "loud"}, "log.level"),
        ({"drain_timeout": "-1"}, "drain_timeout"),
        ({"ws.nope": "1"}, "ws.nope"),
    ],
)
def test_invalid_values_name_the_field(overrides: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(overrides=overrides)


def test_unknown_keys_in_the_file_are_errors(tmp_path: Path) -> None:
    config = tmp_path / "b.toml"
    config.write_text("[ws]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"ws\.prot"):
        load_settings(config)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ws\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_settings(bad)


def test_control_off_loopback_needs_a_token() -> None:
    with pytest.raises(ConfigError, match=r"control\.token"):
        load_settings(overrides={"control.host": "0.0.0.0"})
    s = load_settings(overrides={"control.host": "0.0.0.0", "control.token": "t"})
    assert s.control.token is not None
    for host in ("127.0.0.1", "::1", "localhost", "127.3.2.1"):
        load_settings(overrides={"control.host": host})


def test_check_config_prints_the_effective_configuration_with_secrets_masked() -> None:
    result = run_cli(
        "check-config",
        "--ws-port",
        "9001",
        "--control-token",
        "hunter2",
        env={"BROADCASTD_WS__MAX_CLIENTS": "12"},
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["ws"]["port"] == 9001
    assert effective["ws"]["max_clients"] == 12
    assert effective["control"]["token"] == "**********"
    assert "hunter2" not in result.stdout + result.stderr


def test_lists_of_tables_take_json_as_flags_as_in_the_environment() -> None:
    namespaces = '[{"name": "px", "outbox_messages": 4}]'
    tokens = '[{"name": "orders", "sha256": "' + "0" * 64 + '", "namespaces": ["orders:*"]}]'
    result = run_cli("check-config", "--namespaces", namespaces, "--control-tokens", tokens)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["namespaces"][0]["outbox_messages"] == 4
    assert effective["control"]["tokens"][0]["namespaces"] == ["orders:*"]
    from_env = run_cli("check-config", env={"BROADCASTD_NAMESPACES": namespaces})
    assert json.loads(from_env.stdout)["namespaces"] == effective["namespaces"]


@pytest.mark.parametrize(
    ("args", "env", "field"),
    [
        (["--ws-port", "nope"], {}, "ws.port"),
        ([], {"BROADCASTD_WS__OUTBOX_BYTES": "1"}, "ws.outbox_bytes"),
        (["--control-host", "0.0.0.0"], {}, "control.token"),
        (["--namespaces", "[{"], {}, "--namespaces: not valid JSON"),
        (["--namespaces", '[{"name": "px", "outbox_messages": 0}]'], {}, "outbox_messages"),
    ],
)
def test_invalid_configuration_exits_2_naming_the_field(
    args: list[str], env: dict[str, str], field: str
) -> None:
    for command in ("check-config", "serve"):
        result = run_cli(command, *args, env=env)
        assert result.returncode == 2
        assert field in result.stderr


def test_the_configuration_page_documents_every_setting_with_its_default() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    rows = {
        line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")
    }
    for name, info in iter_fields():
        assert name in rows, f"docs/configuration.md does not document {name}"
        default = info.default
        shown = "unset" if default is None else str(getattr(default, "value", default))
        if isinstance(default, bool):
            shown = str(default).lower()
        if name == "control.unix_mode":
            shown = oct(default)
        assert f"`{shown}`" in rows[name] or shown == "unset", f"{name}: default {shown}"
        assert "BROADCASTD_" + name.replace(".", "__").upper() in rows[name]


def test_none_unsets_optional_settings_in_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "b.toml"
    config.write_text('[ws]\nping_interval = "none"\n')
    monkeypatch.setenv("BROADCASTD_METRICS__PORT", "none")
    s = load_settings(config)
    assert s.ws.ping_interval is None
    assert s.metrics.port is None
    with pytest.raises(ConfigError, match=r"ws\.port"):
        load_settings(overrides={"ws.port": "none"})


@pytest.mark.parametrize(
    ("namespace", "why"),
    [
        ("outbox_messages = 2000", r"outbox_messages must be at most ws\.outbox_messages"),
        ("outbox_bytes = 2000000", r"outbox_bytes must be at most ws\.outbox_bytes"),
        ("outbox_bytes = 2048", "must hold at least one message of its largest payload"),
        ("outbox_messages = 0", "outbox_messages"),
    ],
)
def test_a_namespaces_outbox_bounds_are_a_share_of_the_outbox(
    tmp_path: Path, namespace: str, why: str
) -> None:
    config = tmp_path / "b.toml"
    config.write_text(f'[[namespaces]]\nname = "px"\n{namespace}\n')
    with pytest.raises(ConfigError, match=why):
        load_settings(config)
    config.write_text(
        '[[namespaces]]\nname = "px"\noutbox_messages = 8\noutbox_bytes = 4096\n'
        "max_payload_bytes = 1024\n"
    )
    (px,) = load_settings(config).namespaces
    assert (px.outbox_messages, px.outbox_bytes) == (8, 4096)
