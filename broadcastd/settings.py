"""The one home of broadcastd's configuration.

Settings are built once at start-up from, highest precedence first: command-line
flags, environment variables ``BROADCASTD_*`` (nested fields joined with ``__``,
e.g. ``BROADCASTD_WS__PORT``), an optional TOML file (``--config PATH`` or
``BROADCASTD_CONFIG``), and the defaults below. The resulting object is passed
down; nothing else reads the environment.

Every bound the daemon keeps is a field here, so that memory use can be reasoned
about from this file alone.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from broadcastd.errors import ConfigError

ENV_PREFIX = "BROADCASTD_"
CONFIG_ENV = "BROADCASTD_CONFIG"

MASK = "**********"
"""How secrets are shown (check-config, logs)."""

KiB = 1024
MiB = 1024 * KiB
ENVELOPE_OVERHEAD = 256
"""Upper bound of what the envelope and frame header add to a payload."""


class SlowConsumerPolicy(StrEnum):
    """What happens when a subscriber's outbox is full."""

    DISCONNECT = "disconnect"
    DROP_OLDEST = "drop_oldest"
    CONFLATE = "conflate"


class SubscribeRule(StrEnum):
    """Who may subscribe to a channel."""

    PUBLIC = "public"
    """Anyone who can connect."""
    TOKEN = "token"  # noqa: S105 - a rule's name, not a secret
    """A client whose token's `channels` claim allows the channel."""
    USER = "user"
    """Any client with a valid token (any signed-in user)."""


class Scope(StrEnum):
    """What a control token may do."""

    PUBLISH = "publish"
    READ = "read"
    ADMIN = "admin"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @field_validator("*", mode="before")
    @classmethod
    def _none_means_unset(cls, value: Any) -> Any:
        """TOML has no null: ``"none"`` unsets an optional setting there (and in env)."""
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):
            return None
        return value


def _check_tls_pair(cert_file: Path | None, key_file: Path | None) -> None:
    if (cert_file is None) != (key_file is None):
        raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")


class WebSocketSettings(_Section):
    """The subscriber port."""

    host: str = "0.0.0.0"
    """Address the WebSocket listener binds."""
    port: int = Field(8765, ge=0, le=65535)
    """Port of the WebSocket listener (0 picks a free one)."""
    max_clients: int = Field(10_000, ge=1)
    """Most subscriber connections at once; the next handshake gets HTTP 503."""
    accept_rate: float = Field(0.0, ge=0)
    """New connections accepted per second by this process, with bursts of up to
    one second's worth; a handshake beyond it gets HTTP 503 `rate_limited` with
    `Retry-After`, so that a reconnect storm degrades into retries instead of
    timeouts. 0 accepts as fast as they come."""
    max_channels_per_client: int = Field(100, ge=1)
    """Most channels one connection may subscribe to."""
    max_fragments: int = Field(64, ge=1)
    """Most frames one fragmented message may arrive in; more closes with 1009."""
    max_message_bytes: int = Field(8 * KiB, ge=64)
    """Largest message a client may send (commands are small); larger closes with 1009.
    Commands are handled as they are read, so this is also all that a client can
    have waiting inbound."""
    outbox_messages: int = Field(1024, ge=1)
    """Most frames waiting for one client before the slow-consumer policy applies."""
    outbox_bytes: int = Field(1 * MiB, ge=1 * KiB)
    """Most bytes waiting for one client before the slow-consumer policy applies."""
    write_limit: int = Field(64 * KiB, ge=1 * KiB)
    """Unsent bytes per connection above which its writer pauses."""
    write_delay: float = Field(0.0, ge=0, le=1.0)
    """Seconds a client's frames may be held so that more leave in one write (each
    stays a frame of its own). Saves server CPU when publishes come one at a time;
    every delivery waits up to this long. 0 writes once per event-loop turn."""
    slow_consumer_policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT
    """`disconnect` closes a client that falls behind with 1013; `drop_oldest` drops
    its oldest queued messages and tells it how many it missed; `conflate` keeps only
    the newest queued message of each channel and tells it how many it missed, per
    channel. A namespace may set its own."""
    max_command_errors: int = Field(20, ge=1)
    """Invalid commands tolerated on one connection before it is closed with 1008."""
    open_timeout: float = Field(10.0, gt=0)
    """Seconds a client has to complete the opening handshake."""
    subscribe_timeout: float | None = Field(30.0, gt=0)
    """Seconds a connection may hold no subscription (after opening, or after its last
    unsubscribe) before it is closed with 4000; unset lets it idle for as long as it
    answers pings."""
    ping_interval: float | None = Field(20.0, gt=0)
    """Seconds between keepalive pings (unset disables keepalive)."""
    ping_timeout: float | None = Field(20.0, gt=0)
    """Seconds to wait for a pong before closing the connection as dead."""
    close_timeout: float = Field(3.0, gt=0)
    """Seconds to wait for the closing handshake before aborting the TCP connection."""
    compression: bool = False
    """Accept permessage-deflate offers. Each message is compressed once for every
    subscriber that negotiated it (no context takeover, no compressor per
    connection); it costs CPU per message and saves bandwidth on large JSON."""
    compression_min_bytes: int = Field(256, ge=0)
    """Messages smaller than this go uncompressed even on a compressing connection."""
    allowed_origins: list[str] | None = None
    """Accepted `Origin` header values; unset accepts any (including none)."""
    require_origin: bool = False
    """Refuse handshakes without an `Origin` header (403) when `allowed_origins` is
    set; off, a client that sends none (not a browser) is let through."""
    reuse_port: bool = False
    """Bind the subscriber and control ports with SO_REUSEPORT, so that several
    processes on one machine share them (the kernel spreads connections); each
    process then needs its own metrics port and, without the Redis broker, would
    hold its own channels."""
    tls_cert_file: Path | None = None
    """PEM certificate chain served on the subscriber port, which then speaks
    `wss://` (TLS 1.2 or newer); set with `tls_key_file`. Read again on SIGHUP."""
    tls_key_file: Path | None = None
    """PEM private key of `ws.tls_cert_file`."""

    @model_validator(mode="after")
    def _tls_pair(self) -> WebSocketSettings:
        _check_tls_pair(self.tls_cert_file, self.tls_key_file)
        return self


class ControlSettings(_Section):
    """The publisher port: HTTP, separate from the subscriber port."""

    host: str = "127.0.0.1"
    """Address the control listener binds. Anything but loopback requires a token."""
    port: int = Field(8766, ge=0, le=65535)
    """Port of the control listener (0 picks a free one)."""
    token: SecretStr | None = None
    """Bearer token required on every control request except /healthz and /readyz
    (all scopes)."""
    tokens: list[ControlToken] = []
    """More tokens, each with a name, scopes and channel patterns."""
    unix_path: Path | None = None
    """Also listen on this Unix domain socket."""
    unix_mode: int = Field(0o660, ge=0, le=0o777)
    """File mode of the Unix socket (octal in TOML: 0o660)."""
    max_body_bytes: int = Field(8 * MiB, ge=1 * KiB)
    """Largest request body accepted (413 above it)."""
    max_payload_bytes: int = Field(64 * KiB, ge=16)
    """Largest single message payload (413 for one publish, a per-item error in a batch)."""
    max_batch_items: int = Field(10_000, ge=1)
    """Most messages in one /batch request."""
    max_header_bytes: int = Field(16 * KiB, ge=1 * KiB)
    """Largest request line plus headers (431 above it)."""
    idle_timeout: float = Field(60.0, gt=0)
    """Seconds an idle keep-alive control connection stays open."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds a client has to send a complete request line and headers, however
    slowly the bytes trickle in (nginx's client_header_timeout)."""
    linger_timeout: float = Field(5.0, gt=0)
    """After an error answer that ends a connection mid-request (413, say), the
    rest of the request is read and dropped, so that a client still sending its
    body sees the answer instead of a reset: until the client pauses for this
    many seconds (nginx's lingering_timeout), and at most ``linger_time``."""
    linger_time: float = Field(30.0, gt=0)
    """Seconds a refused request's upload is read and dropped, in all (nginx's
    lingering_time). Nothing dropped is held: the bound is time, not memory."""
    write_limit: int = Field(256 * KiB, ge=1 * KiB)
    """Unread response bytes per control connection above which the server stops
    reading (and answering) its pipelined requests."""
    tls_cert_file: Path | None = None
    """PEM certificate chain served on the control port's TCP listener, which then
    speaks `https://` (TLS 1.2 or newer; the Unix socket stays plain); set with
    `tls_key_file`. Read again on SIGHUP."""
    tls_key_file: Path | None = None
    """PEM private key of `control.tls_cert_file`."""

    @model_validator(mode="after")
    def _tls_pair(self) -> ControlSettings:
        _check_tls_pair(self.tls_cert_file, self.tls_key_file)
        return self


class ChannelSettings(_Section):
    """Channel table bounds, and the options of channels outside any namespace."""

    subscribe: SubscribeRule | None = None
    """Who may subscribe: `public`, `token` or `user`. Unset: `public` when no
    `[auth]` key is configured, `token` once one is."""
    recover: bool = True
    """Allow `since` (resuming from a position, or the last N messages)."""

    max_channels: int = Field(100_000, ge=1)
    """Channels remembered at once. Channels without subscribers are forgotten oldest
    first beyond this (their offsets then restart at 1, in a new epoch); a new channel
    is refused only when every remembered channel has subscribers."""


class HistorySettings(_Section):
    """Channel history: what a subscriber that reconnects can recover."""

    size: int = Field(100, ge=0)
    """Messages kept per channel for recovery (0 turns history and recovery off)."""
    ttl: float = Field(300.0, gt=0)
    """Seconds a message is kept. A channel without subscribers whose whole history
    expired is forgotten: its offsets restart, in a new epoch."""
    max_bytes: int = Field(64 * MiB, ge=1 * MiB)
    """Memory all channels' histories may use together; beyond it the oldest
    messages of any channel are evicted first."""
    max_recover: int = Field(1000, ge=1)
    """Most messages one recovery replays; a subscriber further behind is told it
    cannot recover (`recovered: false`, reason `too_many`)."""


class PublishSettings(_Section):
    """Publishing."""

    idempotency_ttl: float = Field(300.0, gt=0)
    """Seconds an Idempotency-Key is remembered per channel: a repeat within it
    publishes nothing and answers the first publish's position."""
    idempotency_max_keys: int = Field(100_000, ge=1)
    """Idempotency keys remembered at most; beyond it the oldest are forgotten first."""


class BrokerType(StrEnum):
    MEMORY = "memory"
    REDIS = "redis"


class RedisSettings(_Section):
    """The Redis broker: channels shared by every node that uses the same Redis."""

    url: str = "redis://127.0.0.1:6379/0"
    """Redis to use: `redis://[:password@]host:port/db`, `rediss://` (TLS) or
    `unix:///path/to/redis.sock?db=0`. The password is never logged."""
    shards: list[str] | None = None
    """Several Redis URLs instead of `url`: each channel lives on one of them, chosen
    by a consistent hash of its name. Every node must list the same shards."""
    timeout: float = Field(1.0, gt=0)
    """Seconds a Redis command may take; a publish that is not accepted within it is
    answered 503 `broker_unavailable`."""
    connect_timeout: float = Field(1.0, gt=0)
    """Seconds to establish a connection to Redis."""
    prefix: str = Field("broadcastd", min_length=1, max_length=64)
    """Prefix of every key and pub/sub channel this daemon uses in Redis."""
    probe_interval: float = Field(1.0, gt=0)
    """Seconds between probes of the pub/sub path: a message to this node's own probe
    channel, which must come back."""
    probe_timeout: float = Field(3.0, gt=0)
    """Seconds a probe may take to come back before the pub/sub connection is taken
    for wedged: readiness goes false and the connection is rebuilt."""
    backoff_min: float = Field(0.05, gt=0)
    """First delay before reconnecting to Redis; doubled per failure, with full jitter."""
    backoff_max: float = Field(5.0, gt=0)
    """Longest delay between attempts to reconnect to Redis."""
    meta_ttl: float = Field(7 * 24 * 3600.0, gt=0)
    """Seconds a channel's position outlives its last publish in Redis; after that
    its offsets restart, in a new epoch."""


class BrokerSettings(_Section):
    """Where channels live: this process (`memory`), or Redis, shared by many nodes."""

    type: BrokerType = BrokerType.MEMORY
    """`memory` keeps channels in this process; `redis` shares them with every node
    using the same Redis."""
    redis: RedisSettings = RedisSettings()


class AuthSettings(_Section):
    """Subscriber tokens (JWT). Configuring any key turns authentication on."""

    hmac_secret: SecretStr | None = None
    """Secret of HS256/HS384/HS512 tokens."""
    hmac_previous_secret: SecretStr | None = None
    """A previous secret, accepted too while tokens signed with it are in use."""
    public_key_file: Path | None = None
    """PEM public key of RS256, ES256 or EdDSA tokens (the algorithm follows the key)."""
    jwks_url: str | None = None
    """A JWKS document of public keys, chosen by the token's `kid`."""
    jwks_timeout: float = Field(2.0, gt=0)
    """Seconds a fetch of the JWKS document may take."""
    jwks_cache_ttl: float = Field(300.0, gt=0)
    """Seconds the JWKS document is kept before it is fetched again; an unknown `kid`
    fetches it at once (at most once per `jwks_min_refresh`)."""
    jwks_min_refresh: float = Field(10.0, ge=0)
    """Fewest seconds between two fetches of the JWKS document."""
    audience: str | None = None
    """Required `aud` claim."""
    issuer: str | None = None
    """Required `iss` claim."""
    leeway: float = Field(5.0, ge=0)
    """Seconds of clock skew allowed on `exp`, `nbf` and `iat`."""
    expiring_notice: float = Field(30.0, gt=0)
    """Seconds before `exp` that a client is sent an `expiring` event (it may then send
    `refresh` with a new token); without one it is closed with 4003 at `exp` plus
    `leeway`."""
    auth_timeout: float = Field(10.0, gt=0)
    """Seconds a connection may stay unauthenticated (waiting for `{"op": "auth"}`)
    where a channel it wants needs a token."""

    @property
    def enabled(self) -> bool:
        return any(
            key is not None for key in (self.hmac_secret, self.public_key_file, self.jwks_url)
        )


class NamespaceSettings(_Section):
    """Options of the channels named `NAME:...`; unset options are the top-level ones."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    """The part of a channel name before its first `:`."""
    subscribe: SubscribeRule | None = None
    """Who may subscribe: `public`, `token` or `user`."""
    recover: bool | None = None
    """Allow `since` (resuming, or the last N messages)."""
    slow_consumer_policy: SlowConsumerPolicy | None = None
    """What a full outbox does to this namespace's messages."""
    history_size: int | None = Field(None, ge=0)
    """Messages kept per channel (0: no history, no recovery)."""
    history_ttl: float | None = Field(None, gt=0)
    """Seconds a message is kept."""
    max_payload_bytes: int | None = Field(None, ge=16)
    """Largest payload published to this namespace (at most `control.max_payload_bytes`)."""
    outbox_messages: int | None = Field(None, ge=1)
    """Most of this namespace's messages waiting for one client (at most
    `ws.outbox_messages`); beyond, its policy acts on its own messages first."""
    outbox_bytes: int | None = Field(None, ge=1 * KiB)
    """Most bytes of this namespace's messages waiting for one client (at most
    `ws.outbox_bytes`; at least one message of its largest payload)."""
    presence: bool = False
    """Track the channels' subscribers (presence on the control API)."""
    join_leave: bool = False
    """Send the channels' subscribers `join` and `leave` events (the subscribers are
    tracked, as for presence)."""
    presence_for_subscribers: bool = False
    """Let subscribers of a channel ask for its presence themselves (`presence` and
    `presence_stats` commands; needs `presence`)."""
    join_leave_max_subscribers: int = Field(1000, ge=0)
    """Subscribers of a channel beyond which its join and leave events are not sent
    (each is one delivery per subscriber: a reconnect storm would be N² work)."""


class PresenceSettings(_Section):
    """Presence: who subscribes to the channels of namespaces with `presence` or
    `join_leave`."""

    ttl: float = Field(30.0, gt=0)
    """Seconds an entry outlives a node that stopped refreshing it (a crashed
    node's clients then leave; each node refreshes its own every third of this)."""
    max_page: int = Field(1000, ge=1, le=100_000)
    """Most entries in one page of presence or of the connection listing."""


class ControlToken(_Section):
    """One control token: who it is, what it may do, and where."""

    name: str = Field(min_length=1, max_length=64)
    """Names the token in logs and metrics (never the secret)."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of the token: the configuration never holds the token itself."""
    file: Path | None = None
    """A file holding the token (one line), instead of `sha256`."""
    scopes: list[Scope] = Field(default_factory=lambda: [Scope.PUBLISH])
    """`publish` (the publish routes), `read` (channels, history, stats, metrics,
    openapi), `admin` (everything)."""
    namespaces: list[str] | None = None
    """Channel patterns this token may publish to or read (`orders:*`, `news`);
    unset: every channel."""

    @model_validator(mode="after")
    def _one_secret(self) -> ControlToken:
        if (self.sha256 is None) == (self.file is None):
            raise ValueError(f"control token {self.name!r} needs exactly one of sha256 and file")
        return self


class MetricsSettings(_Section):
    """Prometheus metrics."""

    enabled: bool = True
    """Collect metrics and serve them (off: no listener, no collection cost)."""
    host: str = "0.0.0.0"
    """Address of the metrics listener: read-only, so Prometheus needs no publish rights."""
    port: int | None = Field(8767, ge=0, le=65535)
    """Port of the metrics listener; unset serves /metrics on the control port only."""


class LogSettings(_Section):
    """Structured logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level written."""
    format: Literal["auto", "json", "console"] = "auto"
    """`auto` writes JSON lines unless stdout is a terminal."""
    buffer_bytes: int = Field(1 * MiB, ge=4 * KiB)
    """Log bytes held while stdout cannot take them (a stuck log shipper); lines
    beyond this are dropped and counted, never waited for."""
    connection_level: Literal["debug", "info"] = "info"
    """Level of each subscriber connection's `connection.open` and `connection.close`
    events."""
    connection_summary_rate: int = Field(100, ge=0)
    """Connection opens and closes per second beyond which the rest of that second's
    are logged at `debug`, with one `connections.summary` line at `info` giving the
    second's counts (opened, closed, closes by code). 0 logs every one at
    `log.connection_level`."""


class Settings(BaseSettings):
    """Everything the daemon can be told. Built once, passed down."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    ws: WebSocketSettings = WebSocketSettings()
    control: ControlSettings = ControlSettings()
    channels: ChannelSettings = ChannelSettings()
    history: HistorySettings = HistorySettings()
    publish: PublishSettings = PublishSettings()
    broker: BrokerSettings = BrokerSettings()
    auth: AuthSettings = AuthSettings()
    namespaces: list[NamespaceSettings] = []
    """Channel namespaces (`[[namespaces]]` tables; env: a JSON list)."""
    presence: PresenceSettings = PresenceSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    drain_timeout: float = Field(10.0, gt=0)
    """Seconds a SIGTERM drain may take before remaining clients are aborted."""

    @model_validator(mode="after")
    def _control_needs_token_off_loopback(self) -> Settings:
        names = [namespace.name for namespace in self.namespaces]
        if len(set(names)) != len(names):
            raise ValueError("namespaces: each name may be declared once")
        if (
            self.control.token is None
            and not self.control.tokens
            and not is_loopback(self.control.host)
        ):
            raise ValueError(
                f"control.host={self.control.host!r} is not loopback: set control.token "
                "(BROADCASTD_CONTROL__TOKEN) so that only your backends can publish"
            )
        if self.control.token is not None and not self.control.token.get_secret_value():
            raise ValueError("control.token must not be empty")
        if self.ws.outbox_bytes < self.control.max_payload_bytes + ENVELOPE_OVERHEAD:
            raise ValueError(
                "ws.outbox_bytes must hold at least one message of control.max_payload_bytes "
                f"(+{ENVELOPE_OVERHEAD} bytes of envelope)"
            )
        for n in self.namespaces:
            self._check_outbox_share(n)
            if n.presence_for_subscribers and not n.presence:
                raise ValueError(
                    f"namespace {n.name!r}: presence_for_subscribers needs presence = true"
                )
        return self

    def _check_outbox_share(self, n: NamespaceSettings) -> None:
        """A namespace's outbox bounds are a share of each client's outbox."""
        if n.outbox_messages is not None and n.outbox_messages > self.ws.outbox_messages:
            raise ValueError(
                f"namespace {n.name!r}: outbox_messages must be at most ws.outbox_messages"
            )
        if n.outbox_bytes is None:
            return
        if n.outbox_bytes > self.ws.outbox_bytes:
            raise ValueError(f"namespace {n.name!r}: outbox_bytes must be at most ws.outbox_bytes")
        largest = min(n.max_payload_bytes or math.inf, self.control.max_payload_bytes)
        if n.outbox_bytes < largest + ENVELOPE_OVERHEAD:
            raise ValueError(
                f"namespace {n.name!r}: outbox_bytes must hold at least one message of its "
                f"largest payload (+{ENVELOPE_OVERHEAD} bytes of envelope)"
            )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (names resolve nothing here)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the Settings from flags (``overrides``, dotted keys), env and a TOML file.

    Raises ConfigError naming every invalid field and why.
    """
    path = config_file or os.environ.get(CONFIG_ENV) or None
    cls: type[Settings] = Settings
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path}: not found")
        cls = type(
            "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": path}}
        )
    nested = _nest(overrides or {})
    try:
        return cls(**nested)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed TOML file
        raise ConfigError(f"config file {path}: {exc}") from None


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        lines.append(f"{where}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def iter_fields(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf setting as (dotted name, FieldInfo): drives CLI flags and docs."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def effective(settings: Settings) -> dict[str, Any]:
    """The configuration as plain data, secrets masked: what check-config prints."""
    data = settings.model_dump(mode="json")
    if settings.control.token is not None:
        data["control"]["token"] = MASK
    redis = data["broker"]["redis"]
    redis["url"] = mask_url(redis["url"])
    if redis["shards"] is not None:
        redis["shards"] = [mask_url(url) for url in redis["shards"]]
    return data


def mask_url(url: str) -> str:
    """``url`` with any password replaced, fit for logs and check-config."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))
