"""A port's TLS context: TLS 1.2 or newer, and its files read again without
dropping what is open; a bad file keeps the certificate in use."""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from broadcastd.errors import ConfigError
from broadcastd.tls import ServerTls

from .certs import common_name, self_signed
from .conftest import DaemonProcess, recv_json, subscribed
from .test_lifecycle import first


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()
    writer.close()


@asynccontextmanager
async def echo_server(tls: ServerTls) -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=tls.context)
    async with server:
        yield server.sockets[0].getsockname()[1]


def client_context(*trusted: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for cert in trusted:
        context.load_verify_locations(cert)
    return context


Open = tuple[str, asyncio.StreamReader, asyncio.StreamWriter]


async def shown(port: int, context: ssl.SSLContext) -> Open:
    """Connect, echo a line: the certificate's common name, and the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    writer.write(b"ping\n")
    assert await reader.readline() == b"ping\n"
    return common_name(der), reader, writer


async def test_files_read_again_serve_new_handshakes_and_keep_open_ones(tmp_path: Path) -> None:
    old_cert, old_key = self_signed(tmp_path, "old")
    new_cert, new_key = self_signed(tmp_path, "new")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    tls = ServerTls("ws", cert, key)
    trust = client_context(old_cert, new_cert)
    async with echo_server(tls) as port:
        name, before_reader, before = await shown(port, trust)
        assert name == "old"
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        assert tls.reload()
        name, _, after = await shown(port, trust)
        assert name == "new"
        before.write(b"still open\n")
        assert await before_reader.readline() == b"still open\n"
        for writer in (before, after):
            writer.close()


@pytest.mark.parametrize("damage", ["garbage key", "missing cert", "key of another cert"])
async def test_a_bad_file_on_reload_keeps_the_certificate_in_use(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = self_signed(tmp_path, "good")
    trusted = shutil.copy(cert, tmp_path / "trusted.pem")
    other_cert, other_key = self_signed(tmp_path, "other")
    tls = ServerTls("control", cert, key)
    if damage == "garbage key":
        key.write_bytes(b"not a key")
    elif damage == "missing cert":
        cert.unlink()
    else:
        shutil.copy(other_key, key)
    assert not tls.reload()
    async with echo_server(tls) as port:
        name, _, writer = await shown(port, client_context(trusted, other_cert))
        writer.close()
    assert name == "good"


def test_bad_files_at_start_are_a_configuration_error_naming_the_settings(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "a")
    with pytest.raises(ConfigError, match=r"ws\.tls_cert_file / ws\.tls_key_file"):
        ServerTls("ws", cert, tmp_path / "absent.key")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_clients_below_tls_1_2_are_refused(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "srv")
    async with echo_server(ServerTls("ws", cert, key)) as port:
        old = client_context(cert)
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", port, ssl=old)
        modern = client_context(cert)
        modern.maximum_version = ssl.TLSVersion.TLSv1_2
        name, _, writer = await shown(port, modern)
        assert name == "srv"
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
        writer.close()


# The daemon: wss:// and https://, and SIGHUP


def _tls_env(cert: Path, key: Path) -> dict[str, str]:
    return {
        "BROADCASTD_WS__TLS_CERT_FILE": str(cert),
        "BROADCASTD_WS__TLS_KEY_FILE": str(key),
        "BROADCASTD_CONTROL__TLS_CERT_FILE": str(cert),
        "BROADCASTD_CONTROL__TLS_KEY_FILE": str(key),
    }


async def test_the_daemon_serves_wss_and_https_and_reloads_on_sighup(tmp_path: Path) -> None:
    first_cert, first_key = self_signed(tmp_path, "first")
    second_cert, second_key = self_signed(tmp_path, "second")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(first_cert, cert)
    shutil.copy(first_key, key)
    trust = client_context(first_cert, second_cert)
    process = DaemonProcess(env=_tls_env(cert, key))
    try:
        await asyncio.to_thread(process.wait_ready)
        events = process.events()
        ws_url = f"wss://localhost:{process.ws_port}"
        async with (
            httpx.AsyncClient(
                base_url=f"https://localhost:{process.control_port}", verify=trust
            ) as http,
            connect(f"{ws_url}/news", ssl=trust, compression=None) as before,
        ):
            await subscribed(before, "news")
            assert (
                common_name(before.transport.get_extra_info("ssl_object").getpeercert(True))
                == "first"
            )
            shutil.copy(second_cert, cert)
            shutil.copy(second_key, key)
            process.proc.send_signal(signal.SIGHUP)
            reloaded = [await first(process, events, "tls.reloaded") for _ in range(2)]
            assert sorted(e["port"] for e in reloaded) == ["control", "ws"]
            key.write_bytes(b"garbage")
            process.proc.send_signal(signal.SIGHUP)
            failed = [await first(process, events, "tls.reload_failed") for _ in range(2)]
            assert all(e["action"] == "kept the certificate in use" for e in failed)
            async with connect(f"{ws_url}/news", ssl=trust, compression=None) as after:
                await subscribed(after, "news")
                shown = after.transport.get_extra_info("ssl_object").getpeercert(True)
                assert common_name(shown) == "second"
                assert (await http.post("/publish/news", json="over tls")).status_code == 200
                for ws in (before, after):
                    assert (await recv_json(ws))["data"] == "over tls"
            sse_url = f"https://localhost:{process.ws_port}/?channel=news"
            async with http.stream("GET", sse_url, headers={"Accept": "text/event-stream"}) as sse:
                assert sse.status_code == 200
                lines = sse.aiter_lines()
                assert await anext(lines) == "retry: 2000"
                while not (await anext(lines)).startswith("event: subscribed"):
                    pass
        process.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.finish) == 0
    finally:
        process.kill()


def test_a_certificate_without_its_key_is_refused_at_start(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "lonely")
    process = DaemonProcess(env={"BROADCASTD_WS__TLS_CERT_FILE": str(cert)})
    try:
        assert process.finish() == 2
        assert any("tls_key_file" in str(line) for line in process.lines)
    finally:
        process.kill()


def test_an_unreadable_key_is_refused_at_start_naming_the_settings(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "a")
    process = DaemonProcess(env=_tls_env(cert, tmp_path / "absent.key"))
    try:
        assert process.finish() == 2
        assert any("ws.tls_cert_file / ws.tls_key_file" in str(line) for line in process.lines)
    finally:
        process.kill()
