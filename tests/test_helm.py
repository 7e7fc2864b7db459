"""The Helm chart (deploy/helm/broadcastd) lints, renders valid Kubernetes
objects, and configures daemons that start and answer their probes.

``helm lint --strict`` and ``helm template`` run with a real helm binary
(scripts/bootstrap-helm.sh puts one in the venv); every rendered object is
validated by kubernetes-validate against the schemas of the oldest and the
newest Kubernetes the chart supports, strictly (an unknown field fails). Then
the rendered pods are taken at their word: each container's environment, with
its Secrets filled in, must be a configuration ``broadcastd check-config``
accepts, and the pod with several processes is run here (its processes sharing
ports through SO_REUSEPORT, on a real Redis) until each answers the readiness
probe the chart gives it. Without helm the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broadcastd.settings import ENV_PREFIX, Settings, iter_fields

from .conftest import ROOT, DaemonProcess
from .redisserver import RedisServer

CHART = ROOT / "deploy" / "helm" / "broadcastd"
KUBERNETES = ("1.25.0", "1.37.0")
"""The chart's kubeVersion floor, and the newest schemas kubernetes-validate has."""
TIMEOUT = 60
SECRET = "s" * 32

MULTI = [
    *("--set", "engine=redis", "--set", "redis.url=redis://redis:6379/0"),
    *("--set", "replicaCount=3", "--set", "processesPerPod=3"),
    *("--set", "serviceMonitor.enabled=true", "--set", "ingress.enabled=true"),
    *("--set", "ingress.host=push.example.com"),
    *("--set", "auth.existingSecret=jwt", "--set", "auth.publicKeyKey=public.pem"),
    *("--set", "auth.issuer=https://issuer.example"),
    *("--set", "namespaces[0].name=private", "--set", "namespaces[0].subscribe=token"),
    *("--set", "namespaces[0].history_size=10"),
    *("--set", "config.ws\\.max_clients=20000", "--set", "config.history\\.ttl=60.5"),
    *("--set", "config.ws\\.allowed_origins={https://app.example}"),
]
VALUES: dict[str, list[str]] = {
    "defaults": [],
    "redis, 3 pods x 3 processes, auth, namespaces, monitoring": MULTI,
    "redis URL and shards from values, control token given": [
        *("--set", "engine=redis", "--set", "redis.existingSecret=redis"),
        *("--set", "redis.shards={redis://a:6379/0,redis://b:6379/0}"),
        *("--set", "controlToken.existingSecret=publishers", "--set", "replicaCount=2"),
    ],
}


def helm() -> str:
    for candidate in (Path(sys.executable).with_name("helm"), shutil.which("helm")):
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip("helm is not installed (`make unit` runs scripts/bootstrap-helm.sh to fetch it)")


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm(), *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@cache
def rendered(values: str) -> tuple[dict[str, Any], ...]:
    result = run_helm("template", "release", str(CHART), *VALUES[values])
    assert result.returncode == 0, result.stderr
    return tuple(document for document in yaml.safe_load_all(result.stdout) if document)


def objects(values: str, kind: str) -> list[dict[str, Any]]:
    return [document for document in rendered(values) if document["kind"] == kind]


def pod_spec(values: str) -> dict[str, Any]:
    (deployment,) = objects(values, "Deployment")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.mark.parametrize("values", VALUES)
def test_the_chart_lints_strictly(values: str) -> None:
    result = run_helm("lint", "--strict", str(CHART), *VALUES[values])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", VALUES)
def test_the_rendered_objects_are_valid_kubernetes(values: str) -> None:
    kinds = [document["kind"] for document in rendered(values)]
    assert {"Deployment", "Service"} <= set(kinds)
    for document in rendered(values):
        if document["kind"] == "ServiceMonitor":  # a CRD: no schema here
            continue
        for version in KUBERNETES:
            kubernetes_validate.validate(document, version, strict=True)


def test_the_plain_manifests_are_valid_kubernetes_too() -> None:
    """deploy/kubernetes, which the chart grew from, against the same schemas."""
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document["kind"] in ("Kustomization", "ServiceMonitor"):
                continue
            for version in KUBERNETES:
                kubernetes_validate.validate(document, version, strict=True)


def test_the_validation_sees_a_wrong_field() -> None:
    """kubernetes-validate fails on what the API server would refuse, strictly."""
    (deployment,) = objects("defaults", "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES[0], strict=True)


def test_the_chart_refuses_what_would_not_work() -> None:
    for args, reason in [
        (["--set", "replicaCount=2"], "engine: memory keeps channels inside one process"),
        (["--set", "processesPerPod=2"], "engine: memory keeps channels inside one process"),
        (["--set", "engine=redis"], "engine: redis needs redis.url"),
        (["--set", "engine=kafka"], "engine must be memory or redis"),
        (["--set", "drainTimeout=30"], "terminationGracePeriodSeconds must exceed"),
    ]:
        result = run_helm("template", "release", str(CHART), *args)
        assert result.returncode != 0, args
        assert reason in result.stderr, result.stderr


def settings_names() -> set[str]:
    return {ENV_PREFIX + name.replace(".", "__").upper() for name, _ in iter_fields(Settings)}


@pytest.mark.parametrize("values", VALUES)
def test_every_variable_the_chart_sets_names_a_setting(values: str) -> None:
    known = settings_names()
    for container in pod_spec(values)["containers"]:
        names = [entry["name"] for entry in container["env"]]
        assert len(names) == len(set(names)), names
        ours = {name for name in names if name.startswith(ENV_PREFIX)}
        assert ours <= known, sorted(ours - known)


def container_environment(container: dict[str, Any], home: Path) -> dict[str, str]:
    """What the kubelet would give the container's process: fields, Secrets
    (made up here) and ``$(VAR)`` references resolved."""
    environment: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            value = str(entry["value"])
            for name, resolved in environment.items():
                value = value.replace(f"$({name})", resolved)
        elif "fieldRef" in entry["valueFrom"]:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            value = "127.0.0.1"
        else:
            assert "secretKeyRef" in entry["valueFrom"], entry
            value = SECRET
        environment[entry["name"]] = value
    key_file = environment.get("BROADCASTD_AUTH__PUBLIC_KEY_FILE")
    if key_file is not None:  # the Secret's volume, here a file of our own
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        pem = home / "public-key.pem"
        pem.write_bytes(
            key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        environment["BROADCASTD_AUTH__PUBLIC_KEY_FILE"] = str(pem)
    unix_path = environment.get("BROADCASTD_CONTROL__UNIX_PATH")
    if unix_path is not None:  # the pod's emptyDir, here a directory of our own
        environment["BROADCASTD_CONTROL__UNIX_PATH"] = str(home / Path(unix_path).name)
    return environment


def check_config(environment: dict[str, str]) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    result = subprocess.run(
        [sys.executable, "-m", "broadcastd", "check-config"],
        env=base | environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    effective: dict[str, Any] = json.loads(result.stdout)
    return effective


@pytest.mark.parametrize("values", VALUES)
def test_each_container_is_given_a_valid_configuration(values: str, tmp_path: Path) -> None:
    containers = pod_spec(values)["containers"]
    metrics_ports = set()
    for container in containers:
        config = check_config(container_environment(container, tmp_path))
        assert config["control"]["token"] == "**********"
        assert config["ws"]["reuse_port"] is (len(containers) > 1)
        metrics_ports.add(config["metrics"]["port"])
        declared = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert config["metrics"]["port"] in declared.values()
        if "ws" in declared:
            assert (declared["ws"], declared["control"]) == (
                config["ws"]["port"],
                config["control"]["port"],
            )
        if values == "defaults":
            assert config["broker"]["type"] == "memory"
        if values.startswith("redis, 3 pods"):
            assert config["broker"]["type"] == "redis"
            assert config["namespaces"][0]["history_size"] == 10
            assert config["ws"]["allowed_origins"] == ["https://app.example"]
            assert (config["ws"]["max_clients"], config["history"]["ttl"]) == (20000, 60.5)
            assert config["auth"]["issuer"] == "https://issuer.example"
    assert len(metrics_ports) == len(containers)


def test_the_chart_agrees_with_the_daemon_and_the_image() -> None:
    defaults = Settings()
    spec = pod_spec("defaults")
    (container,) = spec["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {
        "ws": defaults.ws.port,
        "control": defaults.control.port,
        "metrics": defaults.metrics.port,
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "control"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "control"}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(next(e["value"] for e in container["env"] if e["name"].endswith("DRAIN_TIMEOUT")))
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()
    assert spec["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_several_processes_are_scraped_and_served_each() -> None:
    values = "redis, 3 pods x 3 processes, auth, namespaces, monitoring"
    containers = pod_spec(values)["containers"]
    assert len(containers) == 3
    names = [port["name"] for container in containers for port in container["ports"]]
    assert names == ["ws", "control", "metrics-0", "metrics-1", "metrics-2"]
    control = next(
        service
        for service in objects(values, "Service")
        if service["metadata"]["name"].endswith("-control")
    )
    served = [port["targetPort"] for port in control["spec"]["ports"]]
    assert served == ["control", "metrics-0", "metrics-1", "metrics-2"]
    (monitor,) = objects(values, "ServiceMonitor")
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == served[1:]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        control["metadata"]["labels"].items()
    )
    (budget,) = objects(values, "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    (ingress,) = objects(values, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"].endswith("-ws")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def processes_of_one_pod(
    redis_server: RedisServer, tmp_path: Path
) -> Iterator[list[tuple[DaemonProcess, list[str]]]]:
    """The containers of the several-processes pod as daemons here, on one
    shared pair of ports, each with the readiness probe command the chart gives it."""
    ws_port, control_port = free_port(), free_port()
    pod: list[tuple[DaemonProcess, list[str]]] = []
    try:
        for container in pod_spec("redis, 3 pods x 3 processes, auth, namespaces, monitoring")[
            "containers"
        ]:
            environment = container_environment(container, tmp_path)
            environment["BROADCASTD_BROKER__REDIS__URL"] = redis_server.url
            probe = list(container["readinessProbe"]["exec"]["command"])
            probe[-1] = environment["BROADCASTD_CONTROL__UNIX_PATH"]
            ports = ("--ws-port", str(ws_port), "--control-port", str(control_port))
            daemon = DaemonProcess(*ports, "--metrics-port", "0", env=environment)
            pod.append((daemon, probe))
        yield pod
    finally:
        for daemon, _ in pod:
            daemon.kill()


def test_the_processes_of_one_pod_share_its_ports_and_answer_their_probes(
    processes_of_one_pod: list[tuple[DaemonProcess, list[str]]],
) -> None:
    for daemon, probe in processes_of_one_pod:
        daemon.wait_ready()
        assert probe[0] == "python"
        answer = subprocess.run(
            [sys.executable, *probe[1:]], capture_output=True, timeout=TIMEOUT, check=False
        )
        assert answer.returncode == 0, answer.stderr
    ports = {(d.ws_port, d.control_port) for d, _ in processes_of_one_pod}
    assert len(ports) == 1
