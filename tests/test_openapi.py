"""The OpenAPI document is the control API: same routes, and every answer conforms.

The document (broadcastd/openapi.json) is written by hand; these tests hold it
and the routes actually served to each other, and let schemathesis generate
requests from it against a live daemon (a subprocess, so that its event loop
is not the test's): every response must conform to the document, none a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection

from broadcastd.transport.control import openapi_document

from .conftest import DaemonProcess, Running

DOCUMENT = Path(__file__).resolve().parent.parent / "broadcastd" / "openapi.json"
TOKEN = "openapi-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def documented_routes() -> dict[str, tuple[str, ...]]:
    doc = json.loads(DOCUMENT.read_bytes())
    return {
        path: tuple(sorted(m.upper() for m in item if m in HTTP_METHODS))
        for path, item in doc["paths"].items()
    }


def test_the_document_is_openapi_3_1_and_ships_in_the_package() -> None:
    doc = json.loads(openapi_document())
    assert doc["openapi"].startswith("3.1.")
    assert openapi_document() == DOCUMENT.read_bytes()
    schemathesis.openapi.from_path(DOCUMENT)  # loads (and checks) the document


async def test_every_route_served_is_documented_and_nothing_else(daemon: Running) -> None:
    served = {
        path: tuple(sorted(m for m in methods if m != "HEAD"))
        for path, methods in daemon.daemon.control.api.routes().items()  # type: ignore[attr-defined]
    }
    assert served == documented_routes()
    # HEAD is answered wherever GET is, as the document's description says.
    assert all(
        "HEAD" in methods
        for methods in daemon.daemon.control.api.routes().values()  # type: ignore[attr-defined]
        if "GET" in methods
    )


async def test_the_document_is_served_behind_the_token(daemon_factory: Any) -> None:
    async with daemon_factory(**{"control.token": TOKEN}) as daemon:
        assert (await daemon.http.get("/openapi.json")).status_code == 401
        response = await daemon.http.get("/openapi.json", headers=AUTH)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.content == DOCUMENT.read_bytes()


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    proc = DaemonProcess("--control-token", TOKEN)
    try:
        proc.wait_ready()
        yield f"http://127.0.0.1:{proc.control_port}"
    finally:
        proc.proc.terminate()
        proc.finish()


schema = schemathesis.openapi.from_path(DOCUMENT)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_the_api_conforms_to_its_document(case: schemathesis.Case, live_url: str) -> None:
    # Any text is a valid text/plain payload: a "negative" body that schemathesis
    # generates as a non-string is sent as its text, which is rightly accepted.
    excluded = [negative_data_rejection] if case.media_type == "text/plain" else []
    case.call_and_validate(base_url=live_url, headers=AUTH, excluded_checks=excluded)
