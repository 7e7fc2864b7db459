"""The manual's runnable examples run, as printed, against a live daemon.

The manual is README.md and the pages under docs/ (the site mkdocs builds): an
example that no longer runs misleads everyone who copies it. So every fenced
block of any of them whose info string is its language, ``python`` or ``sh``,
followed by the word ``runnable``::

    ```python runnable
    ```sh runnable

is run here. GitHub highlights a block by the first word of its info string and
shows none of the rest, and the site's build takes the marker off
(scripts/mkdocs_hooks.py), so it is invisible to readers. A block without
the marker is documentation only: what needs Redis, systemd, Docker, a token
issuer or a daemon on the default ports, and what never ends by itself.

Each example gets a daemon of its own (``broadcastd serve`` in a subprocess:
memory broker, default settings, free loopback ports) and runs as a user would
run it against a daemon on the default ports:

- the default addresses in its text (``127.0.0.1:8765``, ``localhost:8766``, the
  same for the metrics port 8767) are rewritten to the daemon's ports, so the
  manual keeps its natural URLs;
- its environment names the daemon's ports as the daemon's own configuration
  would (``BROADCASTD_WS__PORT``, ``BROADCASTD_CONTROL__PORT``), so
  ``broadcastd publish`` finds it the way it finds a configured one;
- ``python`` examples run with this interpreter; ``sh`` examples run under
  ``bash -e -o pipefail`` with this virtualenv's ``bin`` first on ``PATH``, and
  curl fails on an HTTP error status (a ``.curlrc`` in ``CURL_HOME``), so a
  4xx answer is a failure, not a printed error body.

An example passes when it exits 0 within EXAMPLE_TIMEOUT seconds (it must end
by itself) and the daemon then drains and exits 0 on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ROOT, DaemonProcess

MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
"""Every page whose examples are run."""
MARKER = "runnable"
LANGUAGES = ("python", "sh")
EXAMPLE_TIMEOUT = 60.0
DEFAULT_PORTS = {"ws": 8765, "control": 8766, "metrics": 8767}
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Example:
    language: str
    code: str
    line: int
    """Line number of the opening fence in its page, for the test id."""
    page: str = "README.md"
    """The page, relative to the repository's root."""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.language}"


def fenced_blocks(text: str, page: str = "README.md") -> Iterator[tuple[str, str, int]]:
    """Every fenced code block of a Markdown text: (info string, code, line of
    the opening fence). Indented fences (in list items) lose their indentation."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines):
            closing = _FENCE.match(lines[index])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[index]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            index += 1
        else:
            raise AssertionError(f"{page}:{start + 1}: unclosed code fence")
        index += 1
        yield opening["info"].strip(), "\n".join(body) + "\n", start + 1


def runnable_examples(text: str, page: str = "README.md") -> list[Example]:
    """The blocks marked runnable; a marker on any other language is an error,
    so that a misspelt block cannot silently drop out of the test."""
    examples = []
    for info, code, line in fenced_blocks(text, page):
        words = info.split()
        if MARKER not in words[1:]:
            continue
        language = words[0]
        if language not in LANGUAGES or words[1:] != [MARKER]:
            raise AssertionError(
                f"{page}:{line}: ```{info}: runnable examples are "
                f"```python {MARKER} or ```sh {MARKER}"
            )
        examples.append(Example(language, code, line, page))
    return examples


EXAMPLES = [
    example
    for path in MANUAL
    for example in runnable_examples(
        path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix()
    )
]


def test_the_manual_has_runnable_examples_of_each_language() -> None:
    """Losing the marker from every block would make the other tests vacuous."""
    assert {example.language for example in EXAMPLES} == set(LANGUAGES)


def test_the_fence_parser_reads_markers_indented_blocks_and_long_fences() -> None:
    text = (
        "# t\n\n```sh runnable\necho a\n```\n\n"
        "- item\n\n  ```python runnable\n  print(1)\n    print(2)\n  ```\n\n"
        "````sh\n```sh runnable\n````\n\n"
        "```sh\nnot marked\n```\n"
        "```python runnable\ndef f():\n    pass\n```\n"
    )
    assert runnable_examples(text) == [
        Example("sh", "echo a\n", 3),
        Example("python", "print(1)\n  print(2)\n", 9),
        Example("python", "def f():\n    pass\n", 21),
    ]
    with pytest.raises(AssertionError, match="runnable examples are"):
        runnable_examples("```js runnable\nx\n```\n")


def with_ports(code: str, ports: dict[str, int]) -> str:
    """``code`` with the default ports' addresses pointed at the daemon's ports."""
    for name, default in DEFAULT_PORTS.items():
        code = re.sub(
            rf"\b(?:127\.0\.0\.1|localhost):{default}\b", f"127.0.0.1:{ports[name]}", code
        )
    return code


def test_with_ports_rewrites_only_the_default_addresses() -> None:
    code = "ws://127.0.0.1:8765/ http://localhost:8766/x 127.0.0.1:87650 ws://host:8765"
    assert with_ports(code, {"ws": 1, "control": 2, "metrics": 3}) == (
        "ws://127.0.0.1:1/ http://127.0.0.1:2/x 127.0.0.1:87650 ws://host:8765"
    )


@pytest.fixture
def daemon_process() -> Iterator[DaemonProcess]:
    """``broadcastd serve`` with the default settings, on free loopback ports."""
    process = DaemonProcess()
    try:
        process.wait_ready()
        yield process
    finally:
        process.kill()


def metrics_port(daemon: DaemonProcess) -> int:
    """The metrics port, from the daemon.ready line wait_ready() read."""
    ready = next(line for line in daemon.lines if line.get("event") == "daemon.ready")
    return int(str(ready["metrics"]).rsplit(":", 1)[1])


def example_environment(daemon: DaemonProcess, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROADCASTD_")}
    curl_home = home / "curl"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text("--fail-with-body\n--silent\n--show-error\n")
    env.update(
        BROADCASTD_WS__PORT=str(daemon.ws_port),
        BROADCASTD_CONTROL__PORT=str(daemon.control_port),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        CURL_HOME=str(curl_home),
        PYTHONUNBUFFERED="1",
    )
    return env


def run_example(example: Example, code: str, env: dict[str, str], cwd: Path) -> None:
    """Run one example in a session of its own, so that a timeout ends everything
    it started (background jobs of a shell example included)."""
    if example.language == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=EXAMPLE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        text = output.decode(errors="replace")
        pytest.fail(f"{example.id} did not end within {EXAMPLE_TIMEOUT} s:\n{text}")
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever it left in the background
    assert process.returncode == 0, (
        f"{example.id} exited with status {process.returncode}:\n"
        f"{code}\n--- output ---\n{output.decode(errors='replace')}"
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.id for example in EXAMPLES])
def test_readme_example_runs(
    example: Example, daemon_process: DaemonProcess, tmp_path: Path
) -> None:
    ports = {
        "ws": daemon_process.ws_port,
        "control": daemon_process.control_port,
        "metrics": metrics_port(daemon_process),
    }
    code = with_ports(example.code, ports)
    run_example(example, code, example_environment(daemon_process, tmp_path), tmp_path)
    daemon_process.proc.send_signal(signal.SIGTERM)
    assert daemon_process.finish() == 0, daemon_process.lines[-5:]
