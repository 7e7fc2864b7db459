"""The JavaScript client's own tests (clients/js), run here so that `make test` runs them.

``npm ci`` installs its development dependencies (ws, playwright-core, esbuild)
when node_modules is missing or package-lock.json changed since; then ``npm test``
(Node's test runner against real daemons) and ``npm run test:browser`` (the
example page in headless Chromium). Each skips, saying why, when Node.js and npm
or Chromium are missing. The daemons they start are this interpreter's
``python -m broadcastd``.

Both check that a subscriber token stays out of URLs: the client sends it as its
first frame, so neither the page's console and network errors (Chromium prints
the URL of every WebSocket that fails to connect), nor a proxy's request lines,
nor the daemon's log at debug level carry any part of it, reconnections included.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "js"
STAMP = PACKAGE / "node_modules" / ".package-lock.sha256"
MIN_NODE = 20
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET")


def _run(*args: str, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        done = subprocess.run(
            args,
            cwd=PACKAGE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        pytest.fail(f"{' '.join(args)} took more than {timeout} s:\n{output}")
    return done.returncode, done.stdout


def _chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM_PATH")
    for candidate in (explicit, "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def node_modules() -> None:
    """Node.js and npm present, and the package's dependencies installed."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: the JavaScript client's tests need "
            f"Node.js {MIN_NODE}+ and npm"
        )
    _, version = _run("node", "--version", timeout=30)
    major = re.match(r"v(\d+)", version.strip())
    if major is None or int(major.group(1)) < MIN_NODE:
        pytest.skip(f"Node.js {version.strip()} is too old: the tests need {MIN_NODE}+")
    digest = hashlib.sha256((PACKAGE / "package-lock.json").read_bytes()).hexdigest()
    if not (STAMP.exists() and STAMP.read_text().strip() == digest):
        status, output = _run("npm", "ci", "--no-audit", "--no-fund", timeout=600)
        if status != 0:
            if any(code in output for code in NETWORK_ERRORS):
                pytest.skip(f"npm ci could not reach the npm registry:\n{output[-2000:]}")
            pytest.fail(f"npm ci failed ({status}):\n{output}")
        STAMP.write_text(digest + "\n")


def _npm(*args: str, chromium: str | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
    env["JS_TEST_PYTHON"] = sys.executable  # the daemons: python -m broadcastd
    if chromium is not None:
        env["CHROMIUM_PATH"] = chromium
    status, output = _run("npm", *args, timeout=300, env=env)
    print(output)  # shown with the failure, or with -s
    assert status == 0, f"npm {' '.join(args)} failed ({status}):\n{output}"


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("node_modules")
def test_node() -> None:
    """Unit tests and tests against real daemons, in Node.js."""
    _npm("test")


@pytest.mark.timeout(900)
@pytest.mark.usefixtures("node_modules")
def test_browser() -> None:
    """The example page in headless Chromium, with and without a token."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium; or set CHROMIUM_PATH)")
    _npm("run", "test:browser", chromium=chromium)
