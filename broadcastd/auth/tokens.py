"""Subscriber tokens: verify a JWT and return its Claims, or refuse it with a stable code.

Which key verifies a token is decided by the token's ``alg`` (and ``kid``), and
each key verifies only its own algorithms, so no token can pick how it is
checked: an HS256 token signed with the public key as its secret (the HS/RS
confusion) meets no HMAC secret when only public keys are configured, and an
RS256 token is never checked against an HMAC secret. In order:

* ``HS256``/``HS384``/``HS512``: ``hmac_secret``, then ``hmac_previous_secret``
  if the signature does not verify (rotation).
* a token with a ``kid``, when ``jwks_url`` is set: the JWKS key of that
  ``kid``, with the algorithm that key names (or implies).
* otherwise the PEM key of ``public_key_file``: RS256 for RSA, ES256 for EC
  P-256 (ES384 for P-384, ES512 for P-521), EdDSA for Ed25519 and Ed448.

Anything else (``none``, an algorithm no configured key has) is ``token_invalid``.

Every signature is checked by PyJWT's algorithm object of that ``alg``; the
compact form around it is taken apart here (``_Jws``), as strictly as PyJWT
does it, because PyJWT's ``decode`` costs more per connection than the whole
rest of a handshake (tests/test_auth_tokens.py holds both to the same verdicts).

Claims: ``exp`` is optional, as in Centrifugo (a token without it never
expires); ``exp``, ``nbf`` and ``iat`` are checked here against the injected
clock, with ``leeway``. Each is any finite JSON number (orjson refuses NaN,
Infinity and numbers beyond a double). An ``exp`` later than MAX_EXPIRES (the
last second of year 9999), ``1e20`` say, is accepted as MAX_EXPIRES: as far in
the future as a token can mean, while the ``expires`` a client is told stays a
64-bit integer and the expiry timer a delay the event loop can hold. An ``nbf``
or ``iat`` that far ahead is simply not valid yet; negative times are long past.
``aud`` and ``iss`` are checked only when ``audience`` and ``issuer`` are set
(then they are required); a token's ``aud`` is ignored when no audience is
configured. ``sub`` must be a string and ``channels`` a list of strings when
present.

Refusals carry a fixed message per cause and never any part of the token.
"""

from __future__ import annotations

import asyncio
import binascii
import hmac
import json
import math
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import Algorithm

from broadcastd import log
from broadcastd.auth.claims import Claims
from broadcastd.errors import ConfigError, TokenError
from broadcastd.settings import AuthSettings

Clock: TypeAlias = Callable[[], float]
PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


class TokenCode(StrEnum):
    """The ``code`` of every TokenError raised here (sent to clients; stable)."""

    INVALID = "token_invalid"
    """Malformed, bad signature, refused algorithm, unknown ``kid``, bad claim types."""
    EXPIRED = "token_expired"
    """``exp`` plus ``leeway`` has passed."""
    NOT_YET_VALID = "token_not_yet_valid"
    """``nbf`` or ``iat`` is later than now plus ``leeway``."""
    AUDIENCE = "token_audience"
    """``aud`` missing or not the configured audience."""
    ISSUER = "token_issuer"
    """``iss`` missing or not the configured issuer."""
    UNAVAILABLE = "token_unavailable"
    """The ``kid`` is not cached and the JWKS document could not be fetched."""


MAX_TOKEN_CHARS = 16 * 1024
"""Longer tokens are refused before any decoding: a token is a few hundred bytes."""
MAX_HEADER_CHARS = 1024
"""Longest encoded JOSE header looked at to route a token."""
MAX_JWKS_BYTES = 1024 * 1024
"""Largest JWKS response read (headers included); more is a failed fetch."""
MAX_EXPIRES = 253_402_300_799.0
"""9999-12-31T23:59:59Z: a later ``exp`` is taken as this."""

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
JWKS_ALGORITHMS = frozenset(
    ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
)
"""What a JWKS key may verify: asymmetric algorithms only (a published symmetric
key would let anyone sign)."""
_PUBLIC_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

_log = log.get("broadcastd.auth")


def _refusal(code: TokenCode, message: str) -> TokenError:
    return TokenError(message, code=code.value)


class TokenVerifier:
    """Verifies subscriber tokens; build it once (keys are prepared up front) and share it."""

    def __init__(
        self,
        *,
        secrets: Sequence[bytes] = (),
        public_key: PublicKey | None = None,
        jwks: JwksCache | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        clock: Clock = time.time,
    ) -> None:
        if not secrets and public_key is None and jwks is None:
            raise ConfigError("auth: no token key configured")
        self._secrets = tuple(_prepare_secret(secret) for secret in secrets)
        self._public: dict[str, tuple[Algorithm, Any]] = {}
        if public_key is not None:
            name = _algorithm_of(public_key)
            algorithm = jwt.get_algorithm_by_name(name)
            self._public[name] = (algorithm, algorithm.prepare_key(public_key))
        self._jwks = jwks
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._clock = clock

    @classmethod
    def from_settings(cls, auth: AuthSettings, clock: Clock = time.time) -> TokenVerifier:
        """The verifier of ``[auth]``; reads ``public_key_file`` now. Raises ConfigError."""
        secrets = [
            secret.get_secret_value().encode()
            for secret in (auth.hmac_secret, auth.hmac_previous_secret)
            if secret is not None
        ]
        public_key = None if auth.public_key_file is None else load_public_key(auth.public_key_file)
        jwks = None
        if auth.jwks_url is not None:
            jwks = JwksCache(
                auth.jwks_url,
                timeout=auth.jwks_timeout,
                ttl=auth.jwks_cache_ttl,
                min_refresh=auth.jwks_min_refresh,
                clock=clock,
            )
        return cls(
            secrets=secrets,
            public_key=public_key,
            jwks=jwks,
            audience=auth.audience,
            issuer=auth.issuer,
            leeway=auth.leeway,
            clock=clock,
        )

    def verify_now(self, token: str) -> Claims | None:
        """``verify`` without waiting: the claims, or TokenError, or None when the
        token names a JWKS key (which may need a fetch: use ``verify``). A
        connection storm with HMAC or PEM keys then costs no task per connection."""
        jws = _Jws.parse(token)
        if jws.kid is not None and self._jwks is not None and jws.alg in JWKS_ALGORITHMS:
            return None
        return self._verify_local(jws)

    async def verify(self, token: str) -> Claims:
        """The claims of a valid token; raises TokenError (``code``: a TokenCode value) otherwise.

        Only a token whose ``kid`` is not cached can wait: on the one shared JWKS
        fetch, at most ``jwks_timeout``.
        """
        jws = _Jws.parse(token)
        if jws.kid is not None and self._jwks is not None and jws.alg in JWKS_ALGORITHMS:
            jwk = await self._jwks.key(jws.kid)
            if jws.alg != jwk.algorithm_name:
                raise _refusal(TokenCode.INVALID, "token algorithm is not accepted")
            jws.check(jwk.Algorithm, (jwk.key,))
            return self._claims(jws.claims())
        return self._verify_local(jws)

    def _verify_local(self, jws: _Jws) -> Claims:
        """A token checked with the configured secrets or public key."""
        if jws.alg in HMAC_ALGORITHMS and self._secrets:
            jws.check_hmac(_HMAC_DIGESTS[jws.alg], self._secrets)
        elif jws.alg in self._public:
            algorithm, key = self._public[jws.alg]
            jws.check(algorithm, (key,))
        else:
            raise _refusal(TokenCode.INVALID, "token algorithm is not accepted")
        return self._claims(jws.claims())

    async def prefetch(self) -> bool:
        """Fetch the JWKS document now (at start-up, so that the first connections do
        not wait); False if that failed. True when no JWKS is configured."""
        return True if self._jwks is None else await self._jwks.refresh()

    async def aclose(self) -> None:
        """Stop a JWKS fetch still under way (at shutdown)."""
        if self._jwks is not None:
            await self._jwks.aclose()

    def _claims(self, payload: Mapping[str, Any]) -> Claims:
        """Check the times against the clock, then aud and iss, and take what
        broadcastd uses."""
        now = self._clock()
        expires = _numeric_date(payload, "exp")
        if expires is not None:
            if expires + self._leeway <= now:
                raise _refusal(TokenCode.EXPIRED, "token has expired")
            expires = min(expires, MAX_EXPIRES)
        for name in ("nbf", "iat"):
            moment = _numeric_date(payload, name)
            if moment is not None and moment > now + self._leeway:
                raise _refusal(TokenCode.NOT_YET_VALID, f"token is not valid yet ({name})")
        if self._audience is not None:
            _check_audience(payload.get("aud"), self._audience)
        if self._issuer is not None:
            issuer = payload.get("iss")
            if issuer is None:
                raise _refusal(TokenCode.ISSUER, "token has no iss")
            if issuer != self._issuer:
                raise _refusal(TokenCode.ISSUER, "token iss does not match")
        user = payload.get("sub", "")
        channels = payload.get("channels", [])
        if not isinstance(user, str):
            raise _refusal(TokenCode.INVALID, "token sub must be a string")
        if not isinstance(payload.get("jti", ""), str):  # as PyJWT checks it
            raise _refusal(TokenCode.INVALID, "token jti must be a string")
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise _refusal(TokenCode.INVALID, "token channels must be a list of strings")
        return Claims(
            user=user, expires=expires, channels=tuple(channels), info=payload.get("info")
        )


@dataclass(slots=True)
class _Jws:
    """A token in the JWS compact form, taken apart but not yet trusted.

    The parts are decoded as strictly as PyJWT decodes them (the base64url
    alphabet only, canonical, padding optional), the header is read to choose
    a key, and the payload is parsed only once its signature verified. Every
    signature is checked by PyJWT's algorithm object of the token's ``alg``
    (by ``hmac.digest`` and ``hmac.compare_digest`` for HMAC), with keys
    prepared once; what PyJWT's
    ``decode`` adds around that (key preparation per call, a per-character
    alphabet scan) cost three times the rest of a connection's handshake.
    A header that names extensions (``crit``, ``b64``) is refused: none is
    supported.
    """

    alg: str
    kid: str | None
    signing_input: bytes
    payload: bytes
    """Still base64url-encoded: decoded once the signature verified."""
    signature: bytes
    """Still base64url-encoded."""

    @classmethod
    def parse(cls, token: str) -> _Jws:
        if len(token) > MAX_TOKEN_CHARS:
            raise _refusal(TokenCode.INVALID, "token is too long")
        try:
            data = token.encode("ascii")
        except UnicodeEncodeError:
            raise _refusal(TokenCode.INVALID, "token is malformed") from None
        signing_input, _, signature = data.rpartition(b".")
        head, dot, payload = signing_input.partition(b".")
        if not dot or b"." in payload or len(head) > MAX_HEADER_CHARS:
            raise _refusal(TokenCode.INVALID, "token is malformed")
        try:
            header = orjson.loads(_b64url(head))
        except (ValueError, binascii.Error):
            raise _refusal(TokenCode.INVALID, "token is malformed") from None
        if not isinstance(header, dict):
            raise _refusal(TokenCode.INVALID, "token is malformed")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or not (isinstance(kid, str) or "kid" not in header):
            raise _refusal(TokenCode.INVALID, "token is malformed")
        if "crit" in header or "b64" in header:
            raise _refusal(TokenCode.INVALID, "token header extensions are not supported")
        return cls(alg, kid, signing_input, payload, signature)

    def check(self, algorithm: Algorithm, keys: Sequence[Any]) -> None:
        """The signature verifies with one of ``keys`` (tried in order), or TokenError."""
        try:
            signature = _b64url(self.signature)
        except (ValueError, binascii.Error):
            raise _refusal(TokenCode.INVALID, "token is malformed") from None
        for key in keys:
            if algorithm.verify(self.signing_input, key, signature):
                return
        raise _refusal(TokenCode.INVALID, "token signature does not verify")

    def check_hmac(self, digest: str, keys: Sequence[bytes]) -> None:
        """``check`` for HMAC: OpenSSL's one-shot ``hmac.digest`` and a constant-time
        comparison, as PyJWT's HMAC algorithm does in several Python calls."""
        try:
            signature = _b64url(self.signature)
        except (ValueError, binascii.Error):
            raise _refusal(TokenCode.INVALID, "token is malformed") from None
        for key in keys:
            if hmac.compare_digest(signature, hmac.digest(key, self.signing_input, digest)):
                return
        raise _refusal(TokenCode.INVALID, "token signature does not verify")

    def claims(self) -> dict[str, Any]:
        """The payload of a token whose signature verified: a JSON object."""
        try:
            payload = orjson.loads(_b64url(self.payload))
        except (ValueError, binascii.Error):
            raise _refusal(TokenCode.INVALID, "token is malformed") from None
        if not isinstance(payload, dict):
            raise _refusal(TokenCode.INVALID, "token is malformed")
        return payload


def _b64url(segment: bytes) -> bytes:
    """Decode one base64url segment; ValueError unless it is canonical (re-encodes
    to itself), which also refuses any byte outside the alphabet. Up to two
    ``=`` of padding are accepted, as PyJWT does (some issuers send them)."""
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    if padding and (padding > 2 or len(segment) % 4):
        raise ValueError("bad padding")
    decoded = binascii.a2b_base64(
        stripped.translate(_FROM_URLSAFE) + b"=" * (-len(stripped) % 4), strict_mode=True
    )
    if binascii.b2a_base64(decoded, newline=False).translate(_TO_URLSAFE).rstrip(b"=") != stripped:
        raise ValueError("not canonical base64url")
    return decoded


_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
"""base64url's two letters of its own (binascii's functions, without base64's
Python wrappers, are most of what a connect with a token costs here)."""


def _check_audience(audience: object, expected: str) -> None:
    """``aud`` is the configured audience or a list of strings holding it."""
    if audience is None:
        raise _refusal(TokenCode.AUDIENCE, "token has no aud")
    if isinstance(audience, str):
        audience = [audience]
    if not isinstance(audience, list) or not all(isinstance(a, str) for a in audience):
        raise _refusal(TokenCode.AUDIENCE, "token aud does not match")
    if expected not in audience:
        raise _refusal(TokenCode.AUDIENCE, "token aud does not match")


def _numeric_date(payload: Mapping[str, Any], name: str) -> float | None:
    """A time claim as epoch seconds; a non-number (NaN and true included) is invalid."""
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refusal(TokenCode.INVALID, f"token {name} must be a number")
    moment = float(value)
    if not math.isfinite(moment):
        raise _refusal(TokenCode.INVALID, f"token {name} must be a number")
    return moment


def _prepare_secret(secret: bytes) -> bytes:
    """Refuse at start-up what PyJWT refuses as an HMAC key (empty, PEM, DER or
    JWK-looking), once rather than on every token."""
    try:
        return cast(bytes, _HMAC["HS256"].prepare_key(secret))
    except jwt.InvalidKeyError:
        raise ConfigError("auth.hmac_secret must be non-empty and not a PEM key") from None


_HMAC: dict[str, Algorithm] = {name: jwt.get_algorithm_by_name(name) for name in HMAC_ALGORITHMS}
"""PyJWT's HMAC algorithm of each ``alg`` (it judges the secrets at start-up)."""
_HMAC_DIGESTS = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}


def load_public_key(path: Path) -> PublicKey:
    """Read a PEM public key once; raises ConfigError naming the file and why."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"auth.public_key_file {path}: {exc.strerror}") from None
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"auth.public_key_file {path}: not a PEM public key") from None
    if not isinstance(key, _PUBLIC_KEY_TYPES):
        raise ConfigError(f"auth.public_key_file {path}: unsupported key type")
    _algorithm_of(key)
    return key


def _algorithm_of(key: PublicKey) -> str:
    """The one algorithm a PEM key verifies: the key decides, never the token."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        try:
            return _EC_ALGORITHMS[key.curve.name]
        except KeyError:
            raise ConfigError(f"auth.public_key_file: unsupported curve {key.curve.name}") from None
    return "EdDSA"


class JwksCache:
    """The keys of a JWKS document by ``kid``, fetched lazily and kept through outages.

    * A known ``kid`` is answered from the cache at once; past ``ttl`` the
      document is refetched in the background (the stale key is used meanwhile).
    * An unknown ``kid`` waits for a refetch, unless one was attempted less than
      ``min_refresh`` seconds ago. Concurrent callers share one fetch
      (single-flight), so a flood of tokens with random kids costs one request
      per ``min_refresh``, not one per connection.
    * A failed fetch (refused, ``timeout``, not 200, garbage, no usable key)
      changes nothing: the cached keys keep verifying. A successful one replaces
      the whole set, so a key removed from the document stops verifying.

    An unknown ``kid`` is ``token_invalid`` when the last fetch succeeded (the
    issuer does not have that key) and ``token_unavailable`` when it failed
    (nobody can tell yet).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        ttl: float,
        min_refresh: float,
        clock: Clock = time.time,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        self._endpoint = _Endpoint.parse(url)
        self._timeout = timeout
        self._ttl = ttl
        self._min_refresh = min_refresh
        self._clock = clock
        self._max_bytes = max_bytes
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._last_ok = False
        self._fetch: asyncio.Task[None] | None = None

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key of ``kid``; raises TokenError (token_invalid or token_unavailable)."""
        now = self._clock()
        key = self._keys.get(kid)
        if key is not None:
            if now - self._fetched_at >= self._ttl:
                self._start_fetch(now)
            return key
        fetch = self._start_fetch(now)
        if fetch is not None:
            # wait() neither cancels the shared fetch when this caller is
            # cancelled nor raises when the fetch is cancelled.
            await asyncio.wait((fetch,))
            key = self._keys.get(kid)
            if key is not None:
                return key
        if self._last_ok:
            raise _refusal(TokenCode.INVALID, "token kid is not in the JWKS document")
        raise _refusal(TokenCode.UNAVAILABLE, "the JWKS document could not be fetched")

    async def refresh(self) -> bool:
        """Fetch the document now, or join the fetch under way, whatever
        ``min_refresh`` says (it bounds what clients can cause, not the daemon);
        True if the fetch succeeded."""
        fetch = self._start_fetch(self._clock(), force=True)
        if fetch is not None:
            await asyncio.wait((fetch,))
        return self._last_ok

    async def aclose(self) -> None:
        """Cancel a fetch under way."""
        fetch = self._fetch
        if fetch is not None:
            fetch.cancel()
            await asyncio.wait((fetch,))

    def _start_fetch(self, now: float, force: bool = False) -> asyncio.Task[None] | None:
        """The fetch under way, or a new one if the last began ``min_refresh`` ago."""
        if self._fetch is None and (force or now - self._attempted_at >= self._min_refresh):
            self._attempted_at = now
            self._fetch = asyncio.create_task(self._refresh(), name="jwks-fetch")
        return self._fetch

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._endpoint.get(self._max_bytes)
            keys = parse_jwks(body)
        except Exception as exc:  # any failure leaves the cache as it was
            self._last_ok = False
            _log.warning(
                "jwks.fetch_failed",
                host=self._endpoint.host,
                error=f"{type(exc).__name__}: {exc}"[:200],
            )
        else:
            self._keys = keys
            self._fetched_at = self._clock()
            self._last_ok = True
            _log.debug("jwks.fetched", host=self._endpoint.host, keys=len(keys))
        finally:
            self._fetch = None


def parse_jwks(body: bytes) -> dict[str, jwt.PyJWK]:
    """The usable signing keys of a JWKS document by ``kid``; ValueError if none.

    Entries without a ``kid``, symmetric (``oct``) keys, encryption keys
    (``use`` other than ``sig``), private keys, and keys PyJWT cannot build or
    that do not fit their ``alg`` (an EC key of another curve) are skipped.
    """
    document = json.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        usable = _usable_key(entry)
        if usable is not None:
            keys.setdefault(*usable)
    if not keys:
        raise ValueError("JWKS document has no usable signing key")
    return keys


def _usable_key(entry: object) -> tuple[str, jwt.PyJWK] | None:
    if not isinstance(entry, dict):
        return None
    kid = entry.get("kid")
    if not isinstance(kid, str) or entry.get("kty") == "oct" or entry.get("use", "sig") != "sig":
        return None
    if "d" in entry:  # a private key published by mistake: not a verification key
        return None
    try:
        key = jwt.PyJWK(entry)
        # PyJWT's checks of the key against its algorithm (an EC key's curve
        # against ES256/384/512), which its verify() does not repeat.
        key.Algorithm.prepare_key(key.key)
    except Exception:  # a malformed key in a fetched document is skipped, whatever it is
        return None
    return (kid, key) if key.algorithm_name in JWKS_ALGORITHMS else None


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """Where the JWKS document is: a minimal HTTP/1.1 GET over asyncio streams.

    No redirects, no proxies, no credentials in the URL; the response must be
    200, is read to EOF (``Connection: close``) up to a bound, and may be
    chunked. Certificates are checked with the system's default TLS context.
    """

    host: str
    port: int
    tls: ssl.SSLContext | None
    request: bytes

    @classmethod
    def parse(cls, url: str) -> _Endpoint:
        if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
            raise ConfigError("auth.jwks_url must be printable ASCII without spaces")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
            raise ConfigError("auth.jwks_url must be an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ConfigError("auth.jwks_url must not carry credentials")
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Accept: application/json\r\nUser-Agent: broadcastd\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        default_port = 443 if tls is not None else 80
        return cls(parts.hostname, port or default_port, tls, request)

    async def get(self, max_bytes: int) -> bytes:
        """The response body; raises OSError or ValueError (the caller bounds the time)."""
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
        try:
            writer.write(self.request)
            response = bytearray()
            while chunk := await reader.read(64 * 1024):
                response += chunk
                if len(response) > max_bytes:
                    raise ValueError(f"JWKS response is larger than {max_bytes} bytes")
        finally:
            writer.close()
        return _body_of(bytes(response))


def _body_of(response: bytes) -> bytes:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("incomplete HTTP response")
    status_line, *header_lines = head.split(b"\r\n")
    status = status_line.split(None, 2)
    if len(status) < 2 or status[1] != b"200":
        raise ValueError(f"HTTP status {status_line[:64]!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if b"transfer-encoding" in headers:
        if headers[b"transfer-encoding"] != b"chunked":
            raise ValueError("unsupported Transfer-Encoding")
        return _dechunk(body)
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        if len(body) < length:
            raise ValueError("truncated HTTP response")
        return body[:length]
    return body


def _dechunk(body: bytes) -> bytes:
    """Decode a chunked body (RFC 9112 §7.1); trailers are ignored."""
    out = bytearray()
    position = 0
    while True:
        line_end = body.index(b"\r\n", position)
        size = int(body[position:line_end].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        start = line_end + 2
        end = start + size
        if size < 0 or body[end : end + 2] != b"\r\n":
            raise ValueError("malformed chunked body")
        out += body[start:end]
        position = end + 2
