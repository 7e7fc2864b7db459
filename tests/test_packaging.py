"""What a release ships installs and runs without the source tree.

The sdist and wheel are built once per run, as `make dist` builds them (the
wheel from the sdist), and checked by twine. The wheel is then installed into a
fresh virtual environment in a temporary directory, far from the checkout, and
that installation's own ``broadcastd`` serves, publishes and subscribes: a
module or data file left out of the package fails here, not on a user's
machine. The npm package of the JavaScript client is packed and checked the
same way (publint, arethetypeswrong) and imported from a project that installed
it.

The version is written once, in pyproject.toml; every other place that must
carry it is held to it here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import broadcastd

from .conftest import ROOT
from .test_js_client import node_modules  # noqa: F401 - a fixture used by name

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION: str = PYPROJECT["project"]["version"]
JS = ROOT / "clients" / "js"
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?$")
BUILD_TIMEOUT = 300


def run(*command: str | Path, cwd: Path = ROOT, timeout: float = BUILD_TIMEOUT) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_environment(),
        check=False,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def clean_environment() -> dict[str, str]:
    """This environment less what would point a program back at the checkout."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("BROADCASTD_", "PYTHON", "VIRTUAL_ENV"))
    } | {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONUNBUFFERED": "1"}


# -- one version ----------------------------------------------------------------


def test_the_version_is_semantic_and_every_copy_agrees() -> None:
    assert SEMVER.match(VERSION), VERSION
    assert broadcastd.__version__ == VERSION, "reinstall: pip install -e '.[dev]'"
    package = json.loads((JS / "package.json").read_text())
    assert package["version"] == VERSION, "clients/js/package.json"
    lock = json.loads((JS / "package-lock.json").read_text())
    assert lock["version"] == lock["packages"][""]["version"] == VERSION
    openapi = json.loads((ROOT / "broadcastd" / "openapi.json").read_text())
    assert openapi["info"]["version"] == VERSION, "broadcastd/openapi.json"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'org.opencontainers.image.version="{VERSION}"' in dockerfile, "Dockerfile"
    chart = yaml.safe_load((ROOT / "deploy" / "helm" / "broadcastd" / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION, "deploy/helm/broadcastd/Chart.yaml"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(VERSION)}\] - \d{{4}}-\d\d-\d\d$", changelog, re.M)


def test_broadcastd_version_prints_it() -> None:
    output = run(sys.executable, "-m", "broadcastd", "--version")
    assert output.strip() == f"broadcastd {VERSION}"


# -- the Python packages ----------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built once for the module."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    return out


def only(directory: Path, pattern: str) -> Path:
    (path,) = directory.glob(pattern)
    return path


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_packages_pass_twine_check(dist: Path) -> None:
    wheel = only(dist, f"broadcastd-{VERSION}-py3-none-any.whl")
    sdist = only(dist, f"broadcastd-{VERSION}.tar.gz")
    run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_wheel_holds_the_whole_package(dist: Path) -> None:
    """Every module and data file of the source tree, and the metadata users see."""
    wheel = only(dist, "*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"broadcastd-{VERSION}.dist-info/METADATA").decode()
        entry_points = archive.read(f"broadcastd-{VERSION}.dist-info/entry_points.txt").decode()
    source = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "broadcastd").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert source <= names, sorted(source - names)
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert "broadcastd = broadcastd.cli:main" in entry_points
    for field in ("License-Expression: Apache-2.0", "Requires-Python: >=3.11", "Classifier: "):
        assert field in metadata, field
    assert "Description-Content-Type: text/markdown" in metadata
    with tarfile.open(only(dist, "*.tar.gz")) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert source <= members, sorted(source - members)


class Installed:
    """A virtual environment outside the checkout with the wheel installed."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.bin = home / "venv" / "bin"

    def __call__(self, *args: str, timeout: float = 60) -> str:
        return run(self.bin / "broadcastd", *args, cwd=self.home, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(self.bin / "broadcastd"), *args],
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_environment(),
        )


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    home = tmp_path_factory.mktemp("elsewhere")
    assert not home.resolve().is_relative_to(ROOT)
    run(sys.executable, "-m", "venv", home / "venv", cwd=home)
    wheel = only(dist, "*.whl")
    run(home / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=home)
    return Installed(home)


def json_lines(process: subprocess.Popen[str]) -> Iterator[dict[str, Any]]:
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("{"):
            yield json.loads(line)


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_installed_wheel_serves_publishes_and_subscribes(installed: Installed) -> None:
    where = run(
        installed.bin / "python",
        *("-c", "import broadcastd; print(broadcastd.__file__)"),
        cwd=installed.home,
    )
    assert Path(where.strip()).is_relative_to(installed.home), where
    assert installed("--version").strip() == f"broadcastd {VERSION}"
    daemon = installed.start(
        "serve",
        *("--ws-host", "127.0.0.1", "--ws-port", "0", "--control-port", "0"),
        *("--metrics-port", "0", "--log-format", "json"),
    )
    subscriber: subprocess.Popen[str] | None = None
    try:
        ready = next(event for event in json_lines(daemon) if event["event"] == "daemon.ready")
        ws, control, metrics = (str(ready[name]) for name in ("ws", "control", "metrics"))
        subscriber = installed.start("subscribe", "--url", f"ws://{ws}", "news")
        frames = json_lines(subscriber)
        assert next(frames)["type"] == "subscribed"
        answer = json.loads(
            installed("publish", "--url", f"http://{control}", "news", '{"price": 42}')
        )
        assert answer["offset"] == 1
        assert next(frames) == {"channel": "news", "offset": 1, "data": {"price": 42}}
        with httpx.Client(timeout=10) as http:
            served = http.get(f"http://{control}/openapi.json")
            assert served.status_code == 200
            assert served.json()["info"]["version"] == VERSION
            scrape = http.get(f"http://{metrics}/metrics").text
        build_info = re.search(r"^broadcastd_build_info\{(.*)\} 1\.0$", scrape, re.M)
        assert build_info is not None
        assert f'version="{VERSION}"' in build_info[1]
        subscriber.send_signal(signal.SIGTERM)
        assert subscriber.wait(30) == 128 + signal.SIGTERM
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        for process in (subscriber, daemon):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


# -- the npm package ----------------------------------------------------------------


@pytest.mark.usefixtures("node_modules")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_npm_package_passes_publint_and_arethetypeswrong() -> None:
    run("npm", "run", "--silent", "check:package", cwd=JS)


@pytest.mark.usefixtures("node_modules")
@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_npm_package_installs_and_imports(tmp_path: Path) -> None:
    (packed,) = json.loads(run("npm", "pack", "--json", "--pack-destination", tmp_path, cwd=JS))
    assert packed["version"] == VERSION
    files = {entry["path"] for entry in packed["files"]}
    assert files == {"package.json", "README.md", "index.d.ts", "src/index.js"}
    project = tmp_path / "app"
    project.mkdir()
    (project / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
    tarball = tmp_path / packed["filename"]
    run("npm", "install", "--offline", "--no-audit", "--no-fund", tarball, cwd=project)
    script = (
        "import { BroadcastClient } from '@broadcastd/client';"
        "import meta from '@broadcastd/client/package.json' with { type: 'json' };"
        "if (typeof BroadcastClient !== 'function') throw new Error('no BroadcastClient');"
        "console.log(meta.version);"
    )
    node = shutil.which("node")
    assert node is not None
    assert run(node, "--input-type=module", "-e", script, cwd=project).strip() == VERSION
