"""Subscriber tokens: real keys, real signatures, a real JWKS server on localhost."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broadcastd.auth.claims import Claims
from broadcastd.auth.tokens import (
    _HMAC,
    HMAC_ALGORITHMS,
    MAX_EXPIRES,
    JwksCache,
    TokenCode,
    TokenVerifier,
    _Jws,
    parse_jwks,
)
from broadcastd.errors import ConfigError, TokenError
from broadcastd.settings import AuthSettings

NOW = 1_700_000_000.0
SECRET = "s" * 64  # long enough for HS512, so PyJWT does not warn
PREVIOUS_SECRET = "p" * 64


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """One private key of each kind (RSA generation is slow: once per module)."""
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "Ed25519": ed25519.Ed25519PrivateKey.generate(),
        "Ed448": ed448.Ed448PrivateKey.generate(),
    }


def pem(private_key: Any, tmp_path: Path, name: str = "key.pem") -> Path:
    path = tmp_path / name
    path.write_bytes(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def sign(key: Any, algorithm: str, kid: str | None = None, **claims: Any) -> str:
    payload = {"sub": "alice", "exp": NOW + 600, **claims}
    payload = {name: value for name, value in payload.items() if value is not None}
    headers = None if kid is None else {"kid": kid}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(secret: bytes, payload: dict[str, Any], payload_text: str = "") -> str:
    """An HS256 token signed with any bytes as the secret (PyJWT refuses PEM secrets),
    of ``payload`` or of any ``payload_text``."""
    text = payload_text or json.dumps(payload)
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(text.encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def verifier(clock: Clock, **settings: Any) -> TokenVerifier:
    return TokenVerifier.from_settings(AuthSettings(**settings), clock=clock)


async def refused(verifier: TokenVerifier, token: str, code: TokenCode) -> TokenError:
    """Assert the refusal's code, and that its message quotes no part of the token."""
    with pytest.raises(TokenError) as caught:
        await verifier.verify(token)
    error = caught.value
    assert error.code == code.value, error.message
    assert error.http_status == 401
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in str(error)
    return error


# Each algorithm, with the key it needs.


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
async def test_hmac_tokens_verify_with_the_secret(algorithm: str, clock: Clock) -> None:
    token = sign(SECRET, algorithm, channels=["news", "orders:*"])
    claims = await verifier(clock, hmac_secret=SECRET).verify(token)
    assert claims == Claims(user="alice", expires=NOW + 600, channels=("news", "orders:*"))


@pytest.mark.parametrize(
    ("kind", "algorithm"),
    [
        ("RS256", "RS256"),
        ("ES256", "ES256"),
        ("ES384", "ES384"),
        ("Ed25519", "EdDSA"),
        ("Ed448", "EdDSA"),
    ],
)
async def test_public_key_tokens_verify_with_the_pem_key(
    kind: str, algorithm: str, keys: dict[str, Any], tmp_path: Path, clock: Clock
) -> None:
    check = verifier(clock, public_key_file=pem(keys[kind], tmp_path))
    claims = await check.verify(sign(keys[kind], algorithm))
    assert claims == Claims(user="alice", expires=NOW + 600, channels=())


async def test_the_previous_secret_is_accepted_during_rotation(clock: Clock) -> None:
    check = verifier(clock, hmac_secret=SECRET, hmac_previous_secret=PREVIOUS_SECRET)
    assert (await check.verify(sign(PREVIOUS_SECRET, "HS256"))).user == "alice"
    assert (await check.verify(sign(SECRET, "HS256"))).user == "alice"
    await refused(check, sign("x" * 64, "HS256"), TokenCode.INVALID)


async def test_a_token_without_exp_or_sub_is_accepted(clock: Clock) -> None:
    claims = await verifier(clock, hmac_secret=SECRET).verify(
        sign(SECRET, "HS256", exp=None, sub=None)
    )
    assert claims == Claims(user="", expires=None, channels=())


# Time claims, against the injected clock, with leeway.


async def test_exp_is_checked_with_leeway(clock: Clock) -> None:
    check = verifier(clock, hmac_secret=SECRET, leeway=5)
    token = sign(SECRET, "HS256", exp=NOW - 3)
    assert (await check.verify(token)).expires == NOW - 3
    clock.now += 2
    error = await refused(check, token, TokenCode.EXPIRED)
    assert error.message == "token has expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_a_token_from_the_future_is_not_valid_yet(claim: str, clock: Clock) -> None:
    check = verifier(clock, hmac_secret=SECRET, leeway=5)
    token = sign(SECRET, "HS256", **{claim: NOW + 10})
    await refused(check, token, TokenCode.NOT_YET_VALID)
    clock.now += 5
    assert (await check.verify(token)).user == "alice"


@pytest.mark.parametrize("exp", [1e20, 1e308, 2**64 - 1, MAX_EXPIRES + 1])
async def test_an_exp_past_year_9999_is_accepted_as_year_9999(exp: float, clock: Clock) -> None:
    """A valid JSON number, so a valid token: as far in the future as a token can
    mean, and no further (a client is told ``expires`` as a 64-bit integer)."""
    claims = await verifier(clock, hmac_secret=SECRET).verify(sign(SECRET, "HS256", exp=exp))
    assert claims.expires == MAX_EXPIRES == 253_402_300_799


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"exp": -1e308}, TokenCode.EXPIRED),
        ({"exp": -(2**63)}, TokenCode.EXPIRED),
        ({"exp": -1}, TokenCode.EXPIRED),
        ({"nbf": 1e308}, TokenCode.NOT_YET_VALID),
        ({"iat": 1e308}, TokenCode.NOT_YET_VALID),
        ({"nbf": 2**64 - 1}, TokenCode.NOT_YET_VALID),
        ({"iat": 1e20}, TokenCode.NOT_YET_VALID),
    ],
)
async def test_extreme_time_claims_are_decided_like_any_other(
    claims: dict[str, Any], code: TokenCode, clock: Clock
) -> None:
    await refused(verifier(clock, hmac_secret=SECRET), sign(SECRET, "HS256", **claims), code)


@pytest.mark.parametrize(
    "claims", [{"nbf": -1e308, "iat": -1e308}, {"nbf": -1, "iat": 0}, {"iat": 5e-324}]
)
async def test_time_claims_long_past_are_fine(claims: dict[str, Any], clock: Clock) -> None:
    assert (await verifier(clock, hmac_secret=SECRET).verify(sign(SECRET, "HS256", **claims))).user


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400])
@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
async def test_a_time_claim_that_is_not_a_finite_number_is_invalid(
    claim: str, value: str, clock: Clock
) -> None:
    """JSON has no NaN or Infinity, and a number past a double's range is refused
    with them: the token is malformed."""
    token = hand_signed_hs256(
        SECRET.encode(), {}, payload_text=f'{{"sub": "alice", "{claim}": {value}}}'
    )
    await refused(verifier(clock, hmac_secret=SECRET), token, TokenCode.INVALID)


# Audience and issuer.


async def test_audience_is_required_once_configured(clock: Clock) -> None:
    check = verifier(clock, hmac_secret=SECRET, audience="broadcastd")
    assert (await check.verify(sign(SECRET, "HS256", aud="broadcastd"))).user == "alice"
    assert (await check.verify(sign(SECRET, "HS256", aud=["other", "broadcastd"]))).user == "alice"
    await refused(check, sign(SECRET, "HS256", aud="other"), TokenCode.AUDIENCE)
    await refused(check, sign(SECRET, "HS256"), TokenCode.AUDIENCE)


async def test_aud_is_ignored_when_no_audience_is_configured(clock: Clock) -> None:
    check = verifier(clock, hmac_secret=SECRET)
    assert (await check.verify(sign(SECRET, "HS256", aud="anything"))).user == "alice"


async def test_issuer_is_required_once_configured(clock: Clock) -> None:
    check = verifier(clock, hmac_secret=SECRET, issuer="https://id.example")
    assert (await check.verify(sign(SECRET, "HS256", iss="https://id.example"))).user == "alice"
    await refused(check, sign(SECRET, "HS256", iss="https://evil.example"), TokenCode.ISSUER)
    await refused(check, sign(SECRET, "HS256"), TokenCode.ISSUER)


# Forgeries and malformed tokens.


async def test_a_bad_signature_is_invalid(clock: Clock) -> None:
    check = verifier(clock, hmac_secret=SECRET)
    token = sign(SECRET, "HS256")
    head, _, signature = token.split(".")
    forged_payload = b64(json.dumps({"sub": "mallory", "exp": NOW + 600}).encode())
    error = await refused(check, f"{head}.{forged_payload}.{signature}", TokenCode.INVALID)
    assert error.message == "token signature does not verify"


async def test_alg_none_is_refused(clock: Clock) -> None:
    token = jwt.encode({"sub": "mallory"}, None, algorithm="none")
    await refused(verifier(clock, hmac_secret=SECRET), token, TokenCode.INVALID)


async def test_hs256_signed_with_the_public_key_is_refused(
    keys: dict[str, Any], tmp_path: Path, clock: Clock
) -> None:
    """The HS/RS confusion: the public key (which anyone has) as an HMAC secret."""
    path = pem(keys["RS256"], tmp_path)
    forged = hand_signed_hs256(path.read_bytes(), {"sub": "mallory", "exp": NOW + 600})
    await refused(verifier(clock, public_key_file=path), forged, TokenCode.INVALID)
    both = verifier(clock, public_key_file=path, hmac_secret=SECRET)
    await refused(both, forged, TokenCode.INVALID)


async def test_an_asymmetric_token_is_refused_when_only_a_secret_is_configured(
    keys: dict[str, Any], clock: Clock
) -> None:
    check = verifier(clock, hmac_secret=SECRET)
    await refused(check, sign(keys["RS256"], "RS256"), TokenCode.INVALID)


async def test_the_pem_key_verifies_only_its_own_algorithm(
    keys: dict[str, Any], tmp_path: Path, clock: Clock
) -> None:
    check = verifier(clock, public_key_file=pem(keys["RS256"], tmp_path))
    await refused(check, sign(keys["ES256"], "ES256"), TokenCode.INVALID)
    await refused(check, sign(keys["RS256"], "RS384"), TokenCode.INVALID)
    await refused(check, sign(keys["RS256"], "PS256"), TokenCode.INVALID)


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"sub": 7}, "sub"),
        ({"channels": "news"}, "channels"),
        ({"channels": ["news", 7]}, "channels"),
        ({"exp": "tomorrow"}, "exp"),
        ({"exp": True}, "exp"),
        ({"exp": float("nan")}, "exp"),
        ({"nbf": float("-inf")}, "nbf"),
    ],
)
async def test_claims_of_the_wrong_type_are_invalid(
    claims: dict[str, Any], why: str, clock: Clock
) -> None:
    check = verifier(clock, hmac_secret=SECRET)
    await refused(check, sign(SECRET, "HS256", **claims), TokenCode.INVALID)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9",
        "e30.e30.",
        "W10.e30.x",
        "x" * 20_000,
    ],
)
async def test_malformed_tokens_are_invalid(token: str, clock: Clock) -> None:
    await refused(verifier(clock, hmac_secret=SECRET), token, TokenCode.INVALID)


@given(
    st.text(max_size=300)
    | st.from_regex(r"[A-Za-z0-9_=-]{0,60}(\.[A-Za-z0-9_=-]{0,60}){2}", fullmatch=True)
)
def test_any_string_is_either_a_token_or_a_token_error(text: str) -> None:
    check = TokenVerifier(secrets=[SECRET.encode()], clock=Clock())
    with pytest.raises(TokenError) as caught:
        asyncio.run(check.verify(text))
    assert caught.value.code == "token_invalid"
    if len(text) > 64:  # longer than any message
        assert text not in caught.value.message


# The compact form is read as PyJWT's decode reads it.

HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
PYJWT = jwt.PyJWT({"verify_exp": False, "verify_nbf": False, "verify_iat": False})
"""As the verifier used PyJWT before it read the compact form itself (aud is
checked only when an audience is configured)."""
SCOPES = [{}, {"audience": "a", "issuer": "i"}]
"""Claim checks compared: none configured, then an audience and an issuer."""


def hand_signed(header: Any, payload: Any, secret: bytes = SECRET.encode()) -> str:
    """A token with any header and payload, HMAC-signed with the header's alg
    (HS256 when it names none)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    alg = header.get("alg") if isinstance(header, dict) else None
    digest = HASHES.get(alg if isinstance(alg, str) else "", hashlib.sha256)
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def read_here(token: str, scope: dict[str, str]) -> dict[str, Any] | None:
    """The payload as broadcastd's own reading of the compact form and its claim
    checks accept it (the generated payloads carry no time claims)."""
    claims = TokenVerifier(secrets=[SECRET.encode()], clock=Clock(), **scope)
    try:
        jws = _Jws.parse(token)
        if jws.alg not in HMAC_ALGORITHMS:
            return None
        jws.check(_HMAC[jws.alg], (SECRET.encode(),))
        payload = jws.claims()
        claims._claims(payload)
    except TokenError:
        return None
    return payload


def read_by_pyjwt(token: str, scope: dict[str, str]) -> dict[str, Any] | None:
    options = {"verify_aud": "audience" in scope}
    try:
        payload: dict[str, Any] = PYJWT.decode(
            token, SECRET, algorithms=list(HMAC_ALGORITHMS), options=options, **scope
        )
    except jwt.PyJWTError:
        return None
    return payload


@st.composite
def mutated_tokens(draw: st.DrawFn) -> str:
    """A signed token with a header of many shapes, then perhaps one edit."""
    header: dict[str, Any] = {"alg": draw(st.sampled_from(["HS256", "HS384", "HS512", "none"]))}
    header.update(
        draw(
            st.dictionaries(
                st.sampled_from(["typ", "kid", "crit", "b64", "cty"]),
                st.none() | st.booleans() | st.integers(0, 3) | st.just("JWT") | st.just(["b64"]),
                max_size=2,
            )
        )
    )
    payload = draw(
        st.dictionaries(
            st.sampled_from(["sub", "jti", "aud", "iss", "x"]),
            st.integers(-(2**53), 2**53)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=4)
            | st.lists(st.text(max_size=3))
            | st.sampled_from(["a", "i", ["a"], ["b", "a"], ["a", 1], "", []])
            | st.none(),
            max_size=3,
        )
        | st.lists(st.integers(0, 9), max_size=2)
    )
    token = hand_signed(header, payload)
    edit = draw(st.sampled_from(["none", "replace", "insert", "delete", "pad"]))
    if edit == "none" or not token:
        return token
    where = draw(st.integers(0, len(token) - 1))
    char = draw(st.sampled_from(list("AQgwB_-=+/. ~\x00é")))
    if edit == "replace":
        return token[:where] + char + token[where + 1 :]
    if edit == "insert":
        return token[:where] + char + token[where:]
    if edit == "delete":
        return token[:where] + token[where + 1 :]
    parts = token.split(".")
    index = draw(st.integers(0, 2))
    parts[index] += "=" * draw(st.integers(1, 3))
    return ".".join(parts)


@settings(max_examples=500, deadline=None)
@given(mutated_tokens())
@example(hand_signed({"alg": "HS256"}, {"sub": "a"}) + "=")  # padding on the signature
@example(hand_signed({"alg": "HS256"}, {"sub": "a"})[:-1] + "B")  # unused bits set
@example(hand_signed({"alg": "HS256", "crit": ["b64"], "b64": True}, {"sub": "a"}))
@example(hand_signed({"alg": "HS256", "kid": 1}, {"sub": "a"}))
@example(hand_signed({"alg": "HS256", "kid": None}, {}))  # found: a null kid was let through
@example(hand_signed({"alg": "HS256"}, [1]))
@example(hand_signed({"alg": "HS256"}, {"jti": 5}))  # found by review: a number let through
def test_the_compact_form_is_read_as_pyjwt_reads_it(token: str) -> None:
    """Never more permissive than PyJWT's decode, and the same payload; as
    permissive, but for the header extensions (``crit``, ``b64``) refused here."""
    for scope in SCOPES:
        here, pyjwt = read_here(token, scope), read_by_pyjwt(token, scope)
        if here is not None:
            assert pyjwt == here
        elif pyjwt is not None:
            header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
            assert "crit" in header or "b64" in header


# Configuration errors surface at construction.


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no token key"):
        TokenVerifier.from_settings(AuthSettings())
    with pytest.raises(ConfigError, match="public_key_file"):
        TokenVerifier.from_settings(AuthSettings(public_key_file=tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        TokenVerifier.from_settings(AuthSettings(public_key_file=tmp_path / "junk.pem"))
    (tmp_path / "k1.pem").write_bytes(
        ec.generate_private_key(ec.SECP256K1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="unsupported curve"):
        TokenVerifier.from_settings(AuthSettings(public_key_file=tmp_path / "k1.pem"))
    for url in (
        "ftp://keys.example/jwks",
        "http:///jwks",
        "http://u:p@keys.example/",
        "http://x:99999/",
    ):
        with pytest.raises(ConfigError, match="jwks_url"):
            TokenVerifier.from_settings(AuthSettings(jwks_url=url))


# JWKS, served by a real HTTP server on localhost.


class JwksServer:
    """Serves a JWKS document; ``mode`` makes it misbehave; counts the requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.mode = "ok"
        self.requests = 0
        self.requested = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def publish(self, *entries: tuple[str, Any]) -> None:
        """Serve the public halves of ``(kid, private_key)``."""
        self.keys = [jwk(kid, private_key) for kid, private_key in entries]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            assert request.startswith(b"GET /.well-known/jwks.json HTTP/1.1\r\n")
            self.requests += 1
            self.requested.set()
            if self.mode == "slow":
                await reader.read()  # until the client gives up and hangs up
                return
            writer.write(self._response())
            await writer.drain()
        finally:
            writer.close()

    def _response(self) -> bytes:
        body = json.dumps({"keys": self.keys}).encode()
        status = "200 OK"
        if self.mode == "garbage":
            body = b"<html>502 Bad Gateway</html>"
        elif self.mode == "no_keys":
            body = b'{"keys": [{"kty": "RSA", "kid": "broken", "n": "AQAB"}]}'
        elif self.mode == "error":
            status = "500 Internal Server Error"
        elif self.mode == "chunked":
            half = len(body) // 2
            chunks = b"".join(
                b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:])
            )
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


def jwk(kid: str, private_key: Any) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "use": "sig"}


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def make_jwks_verifier(
    server: JwksServer, clock: Clock
) -> AsyncIterator[Callable[..., TokenVerifier]]:
    made: list[TokenVerifier] = []

    def make(**settings: Any) -> TokenVerifier:
        settings = {
            "jwks_url": server.url,
            "jwks_min_refresh": 10,
            "jwks_cache_ttl": 300,
            **settings,
        }
        made.append(verifier(clock, **settings))
        return made[-1]

    yield make
    for check in made:
        await check.aclose()


async def test_jwks_keys_of_each_kind_verify(
    server: JwksServer, make_jwks_verifier: Callable[..., TokenVerifier], keys: dict[str, Any]
) -> None:
    server.publish(("r", keys["RS256"]), ("e", keys["ES256"]), ("o", keys["Ed25519"]))
    check = make_jwks_verifier()
    assert (await check.verify(sign(keys["RS256"], "RS256", kid="r"))).user == "alice"
    assert (await check.verify(sign(keys["ES256"], "ES256", kid="e"))).user == "alice"
    assert (await check.verify(sign(keys["Ed25519"], "EdDSA", kid="o"))).user == "alice"
    assert server.requests == 1


async def test_a_jwks_key_verifies_only_its_own_algorithm(
    server: JwksServer,
    make_jwks_verifier: Callable[..., TokenVerifier],
    keys: dict[str, Any],
    tmp_path: Path,
) -> None:
    server.publish(("r", keys["RS256"]))
    check = make_jwks_verifier(hmac_secret=SECRET)
    await refused(check, sign(keys["ES256"], "ES256", kid="r"), TokenCode.INVALID)
    public_pem = pem(keys["RS256"], tmp_path).read_bytes()
    forged = hand_signed_hs256(public_pem, {"sub": "mallory"})
    await refused(check, forged, TokenCode.INVALID)


async def test_a_jwks_token_needs_a_kid(
    server: JwksServer, make_jwks_verifier: Callable[..., TokenVerifier], keys: dict[str, Any]
) -> None:
    server.publish(("r", keys["RS256"]))
    await refused(make_jwks_verifier(), sign(keys["RS256"], "RS256"), TokenCode.INVALID)
    assert server.requests == 0


def test_symmetric_and_broken_jwks_entries_are_skipped(keys: dict[str, Any]) -> None:
    document = {
        "keys": [
            {"kty": "oct", "kid": "sym", "k": b64(SECRET.encode())},
            {**jwk("enc", keys["RS256"]), "use": "enc"},
            {**jwk("nokid", keys["RS256"]), "kid": None},
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            "not a key",
            {**jwk("curve", keys["ES256"]), "alg": "ES384"},  # a P-256 key for ES384
            {**jwk("private", keys["RS256"]), "d": "AQAB"},
            jwk("good", keys["ES256"]),
        ]
    }
    assert list(parse_jwks(json.dumps(document).encode())) == ["good"]
    with pytest.raises(ValueError, match="no usable"):
        parse_jwks(json.dumps({"keys": document["keys"][:7]}).encode())


async def test_key_rotation_costs_one_fetch(
    server: JwksServer,
    make_jwks_verifier: Callable[..., TokenVerifier],
    keys: dict[str, Any],
    clock: Clock,
) -> None:
    server.publish(("a", keys["RS256"]))
    check = make_jwks_verifier()
    old, new = sign(keys["RS256"], "RS256", kid="a"), sign(keys["ES256"], "ES256", kid="b")
    assert (await check.verify(old)).user == "alice"
    assert server.requests == 1

    server.publish(("a", keys["RS256"]), ("b", keys["ES256"]))
    clock.now += 10
    assert (await check.verify(new)).user == "alice"
    assert (await check.verify(old)).user == "alice"
    assert server.requests == 2

    # Once the document drops a key (at the next refresh), it stops verifying.
    server.publish(("b", keys["ES256"]))
    clock.now += 300
    assert (await check.verify(new)).user == "alice"  # stale: answered at once, refetched
    assert await check.prefetch()  # joins that background fetch
    assert server.requests == 3
    await refused(check, old, TokenCode.INVALID)


async def test_a_flood_of_unknown_kids_costs_one_fetch(
    server: JwksServer,
    make_jwks_verifier: Callable[..., TokenVerifier],
    keys: dict[str, Any],
    clock: Clock,
) -> None:
    server.publish(("a", keys["RS256"]))
    check = make_jwks_verifier()
    flood = [sign(keys["ES256"], "ES256", kid=f"random-{n}") for n in range(50)]

    results = await asyncio.gather(*map(check.verify, flood), return_exceptions=True)
    assert server.requests == 1  # the cold cache's first fetch, shared by all 50
    assert {getattr(r, "code", r) for r in results} == {"token_invalid"}

    results = await asyncio.gather(*map(check.verify, flood), return_exceptions=True)
    assert server.requests == 1  # within jwks_min_refresh: no fetch at all
    assert {getattr(r, "code", r) for r in results} == {"token_invalid"}

    clock.now += 10
    results = await asyncio.gather(*map(check.verify, flood), return_exceptions=True)
    assert server.requests == 2
    assert {getattr(r, "code", r) for r in results} == {"token_invalid"}
    assert (await check.verify(sign(keys["RS256"], "RS256", kid="a"))).user == "alice"


@pytest.mark.parametrize("failure", ["down", "slow", "garbage", "no_keys", "error"])
async def test_a_failing_jwks_server_keeps_the_cached_keys(
    failure: str,
    server: JwksServer,
    make_jwks_verifier: Callable[..., TokenVerifier],
    keys: dict[str, Any],
    clock: Clock,
) -> None:
    """Known kids keep verifying; an unknown kid is token_unavailable (nobody can tell
    whether it is genuine) instead of token_invalid."""
    server.publish(("a", keys["RS256"]))
    check = make_jwks_verifier(jwks_timeout=0.2)
    known, unknown = sign(keys["RS256"], "RS256", kid="a"), sign(keys["ES256"], "ES256", kid="b")
    assert await check.prefetch()

    if failure == "down":
        await server.stop()
    else:
        server.mode = failure
    server.publish(("a", keys["RS256"]), ("b", keys["ES256"]))
    clock.now += 300  # past the cache TTL
    assert (await check.verify(known)).user == "alice"
    assert not await check.prefetch()  # the background refetch failed
    assert (await check.verify(known)).user == "alice"

    clock.now += 10
    await refused(check, unknown, TokenCode.UNAVAILABLE)
    assert (await check.verify(known)).user == "alice"
    expected_requests = 1 if failure == "down" else 3
    assert server.requests == expected_requests

    if failure != "down":  # and once the server recovers, so does the unknown kid
        server.mode = "ok"
        clock.now += 10
        assert (await check.verify(unknown)).user == "alice"


async def test_a_chunked_jwks_response_is_read(
    server: JwksServer, make_jwks_verifier: Callable[..., TokenVerifier], keys: dict[str, Any]
) -> None:
    server.publish(("a", keys["RS256"]))
    server.mode = "chunked"
    check = make_jwks_verifier()
    assert (await check.verify(sign(keys["RS256"], "RS256", kid="a"))).user == "alice"


async def test_an_oversized_jwks_response_is_a_failed_fetch(
    server: JwksServer, keys: dict[str, Any], clock: Clock
) -> None:
    server.publish(*((f"k{n}", keys["RS256"]) for n in range(20)))
    cache = JwksCache(server.url, timeout=2, ttl=300, min_refresh=10, clock=clock, max_bytes=4096)
    assert not await cache.refresh()
    with pytest.raises(TokenError) as caught:
        await cache.key("k0")
    assert caught.value.code == "token_unavailable"


async def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch(
    server: JwksServer,
    make_jwks_verifier: Callable[..., TokenVerifier],
    keys: dict[str, Any],
) -> None:
    server.mode = "slow"
    check = make_jwks_verifier(jwks_timeout=0.2)
    token = sign(keys["RS256"], "RS256", kid="a")
    first = asyncio.create_task(check.verify(token))
    second = asyncio.create_task(check.verify(token))
    await server.requested.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    with pytest.raises(TokenError) as caught:
        await second
    assert caught.value.code == "token_unavailable"
    assert server.requests == 1
