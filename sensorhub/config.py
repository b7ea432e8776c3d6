"""Configuration: pydantic-settings models, environment ``SENSORHUB_*`` and a TOML file.

Precedence, highest first: explicit arguments, environment, the TOML file
(``--config FILE`` or ``SENSORHUB_CONFIG``), defaults. Environment names are
``SENSORHUB_<SECTION>_<KEY>``, split at the first underscore after the section,
so ``SENSORHUB_CLICKHOUSE_URL`` sets ``clickhouse.url`` and
``SENSORHUB_INGEST_FLUSH_MS`` sets ``ingest.flush_ms``; a list or a table is
given as JSON (``SENSORHUB_DICTIONARY='{"1": "temp_c"}'``).

Every bad value raises :class:`~sensorhub.errors.ConfigError` naming the key and
the expected form. Every bound in the product is a setting here.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from sensorhub.errors import ConfigError

__all__ = [
    "AlertRule",
    "AlertsSettings",
    "BackoffSettings",
    "ClickHouseSettings",
    "IngestSettings",
    "MetricsSettings",
    "MqttSettings",
    "RedisSettings",
    "Settings",
    "SourceSettings",
    "TopicRoute",
    "WriterSettings",
    "load_settings",
    "mask_url",
    "read_secret_file",
]

FORMATS = ("frame", "json", "ilp", "sparkplug")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def secret(self, name: str) -> str | None:
        """The secret setting ``name``: read from ``<name>_file`` when that is set, else the value itself.

        The file is read at each call (its first line, without the line end), so a process that
        reconnects picks up a rotated secret. ``<name>_file`` is how secrets reach the services:
        a file of mode 0600, or a systemd credential (``LoadCredential=``, ``%d/<name>`` in the unit).
        """
        path = getattr(self, f"{name}_file", None)
        if path is not None:
            return read_secret_file(path)
        value = getattr(self, name, None)
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        return value if isinstance(value, str) else None


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """The first line of ``path``, without the line end: how every sensorhub process reads a secret."""
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def _check_secret_file(v: Path | None) -> Path | None:
    """A ``*_file`` setting names a readable file; its content is not kept in the settings."""
    if v is None:
        return v
    try:
        read_secret_file(v)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"a readable file holding the secret on its first line ({v}: {exc.__class__.__name__})")
    return v


def _check_tls_file(v: Path | None) -> Path | None:
    if v is not None and not Path(v).is_file():
        raise ValueError(f"a readable PEM file ({v} does not exist)")
    return v


class BackoffSettings(_Section):
    """Capped exponential backoff with full jitter; retries never give up."""

    initial_s: float = Field(0.1, gt=0, description="first delay")
    max_s: float = Field(5.0, gt=0, description="cap on any delay")
    factor: float = Field(2.0, ge=1.0)


class TopicRoute(_Section):
    """Maps an MQTT topic filter to a decoder and says which topic level names the device."""

    filter: str = Field(min_length=1)
    format: Literal["frame", "json", "ilp", "sparkplug"]
    device_level: int = Field(2, ge=-1, description="0-based topic level holding the device id; -1: none")

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, v: str) -> str:
        levels = v.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError("'#' must be a whole last level")
            if "+" in level and level != "+":
                raise ValueError("'+' must be a whole level")
        return v


DEFAULT_ROUTES = (
    TopicRoute(filter="sensors/+/+/frame", format="frame", device_level=2),
    TopicRoute(filter="sensors/+/+/json", format="json", device_level=2),
    TopicRoute(filter="sensors/+/+/ilp", format="ilp", device_level=2),
)


class MqttSettings(_Section):
    client: Literal["paho", "native"] = Field(
        "native",
        description="driver of the mqtt source: native (Cython framing, coalesced acks; about a sixth "
        "of paho's CPU per message) or paho (paho-mqtt, the fallback)",
    )
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = Field(
        "", max_length=128,
        description="fixed MQTT client id (the persistent session is tied to it); empty: sensorhub-<source>-<hostname>",
    )
    username: str | None = None
    username_file: Path | None = Field(
        None, description="file holding the user name (first line); wins over username; read at each connect, "
        "so an account can be swapped without a restart")
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the password (first line); wins over password")
    tls: bool = Field(False, description="connect with TLS (1.2 or later), checking the broker's certificate")
    ca_file: Path | None = Field(None, description="CA certificates (PEM) the broker's certificate must chain to; "
                                 "unset: the system's")
    cert_file: Path | None = Field(None, description="client certificate (PEM), when the broker asks for one")
    key_file: Path | None = Field(None, description="private key of cert_file (PEM)")
    qos: Literal[0, 1] = 1
    keepalive_s: int = Field(30, ge=5, le=3600)
    session_expiry_s: int = Field(
        7 * 24 * 3600, ge=0, description="how long the broker keeps our session while we are away"
    )
    receive_maximum: int = Field(
        4096, ge=1, le=65535, description="QoS 1 messages in flight from broker to us, unacked"
    )
    shared_group: str | None = Field(
        None, description="MQTT v5 shared subscription group ($share/<group>/...) to spread devices"
    )
    routes: tuple[TopicRoute, ...] = DEFAULT_ROUTES
    sparkplug: bool = Field(True, description="run the Sparkplug B host on its own clean-session connection")
    sparkplug_host_id: str = "sensorhub"
    sparkplug_group_filter: str = "spBv1.0/#"
    max_payload_bytes: int = Field(1 << 20, ge=64, description="larger payloads are dead-lettered")

    _password_file = field_validator("password_file", "username_file")(_check_secret_file)
    _tls_files = field_validator("ca_file", "cert_file", "key_file")(_check_tls_file)

    @model_validator(mode="after")
    def _key_with_cert(self) -> MqttSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt.cert_file and mqtt.key_file together, or neither")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ValueError("mqtt.tls = true when mqtt.ca_file or mqtt.cert_file is set")
        return self


class RedisSettings(_Section):
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis://[USER:PASSWORD@]HOST:PORT/DB, rediss:// for TLS, or unix://PATH; "
        "username and password below win over the URL's",
    )
    username: str | None = Field(None, description="Redis ACL user")
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the password (first line); wins over password")
    ca_file: Path | None = Field(None, description="CA certificates (PEM) for rediss://; unset: the system's")
    partitions: int = Field(8, ge=1, le=1024, description="P partition streams for readings")
    prefix: str = Field("sh", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    group: str = Field("writers", min_length=1)
    socket_timeout_s: float = Field(5.0, gt=0)
    cluster: bool = Field(
        False,
        description="Redis Cluster: url names one node (or several, HOST:PORT,HOST:PORT) to learn the "
        "cluster from; a url with ?cluster=true selects it too",
    )
    min_replicas: int | None = Field(
        None, ge=0, le=16,
        description="replicas that must hold a write (WAIT) before ingest acknowledges it upstream; "
        "unset: 1 on a master that has replicas, else 0",
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    _password_file = field_validator("password_file")(_check_secret_file)
    _ca_file = field_validator("ca_file")(_check_tls_file)


_DATABASE = r"[A-Za-z_][A-Za-z0-9_]*"


def _url_database(url: str) -> str | None:
    """The database a ClickHouse URL names (``http://HOST:PORT/DATABASE``), if any."""
    m = re.match(r"^https?://[^/]+/([^/?#]+)/?$", url)
    return m.group(1) if m else None


class ClickHouseSettings(_Section):
    """ClickHouse over HTTP. ``url`` may name the database (``http://HOST:PORT/DATABASE``,
    as clickhouse-connect DSNs do); it then sets ``database``, and naming two different
    databases is an error."""

    url: str = "http://127.0.0.1:8123"
    database: str = Field("sensorhub", pattern=rf"^{_DATABASE}$")
    user: str = "default"
    password: SecretStr = SecretStr("")
    password_file: Path | None = Field(None, description="file holding the password (first line); wins over password")
    ca_file: Path | None = Field(None, description="CA certificates (PEM) for an https:// url; unset: the system's")
    connect_timeout_s: float = Field(5.0, gt=0)
    send_receive_timeout_s: float = Field(60.0, gt=0)
    cluster: str | None = Field(None, description="generate Replicated*/Distributed DDL for this cluster")
    # Days rows are kept after they were stored (the tables' TTL); `sensorhub schema migrate` applies a change.
    retention_days: int = Field(30, ge=1, le=36_500, description="raw readings (readings)")
    trades_retention_days: int = Field(90, ge=1, le=36_500, description="trades")
    dead_letters_retention_days: int = Field(
        60, ge=7, le=36_500, description="dead letters and their replays: time to fix the cause and replay them"
    )
    audit_retention_days: int = Field(400, ge=1, le=36_500, description="ingest_audit")
    hop_latency_retention_days: int = Field(30, ge=1, le=36_500, description="hop_latency")
    rollup_minute_retention_days: int = Field(
        730, ge=1, le=36_500, description="readings_by_minute, by the minute's device time; at least retention_days"
    )
    rollup_hour_retention_days: int = Field(
        1830, ge=1, le=36_500, description="readings_by_hour, by the hour's device time; at least retention_days"
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, v: str) -> str:
        if not re.match(rf"^https?://([^/@]*@)?[^/:@]+(:\d+)?(/({_DATABASE})?)?/?$", v):
            raise ValueError("must look like http://HOST:PORT or http://[USER:PASSWORD@]HOST:PORT/DATABASE")
        return v

    _password_file = field_validator("password_file")(_check_secret_file)
    _ca_file = field_validator("ca_file")(_check_tls_file)

    @model_validator(mode="before")
    @classmethod
    def _credentials_from_url(cls, data: Any) -> Any:
        """``http://USER:PASSWORD@HOST:PORT/DB``: the user and password move to ``user`` and ``password``
        (percent-decoded), and ``url`` keeps the rest, so no client prints them with the URL."""
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            return data
        m = re.match(r"^(https?://)([^/@]*)@(.*)$", data["url"])
        if not m:
            return data
        user, _, password = m.group(2).partition(":")
        out = {**data, "url": m.group(1) + m.group(3)}
        if user:
            out["user"] = urllib.parse.unquote(user)
        if password:
            out["password"] = urllib.parse.unquote(password)
        return out

    @model_validator(mode="before")
    @classmethod
    def _database_from_url(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            return data
        named = _url_database(data["url"])
        if named is None:
            return data
        if "database" not in data:
            return {**data, "database": named}
        if data["database"] != named:
            raise ValueError(
                f"the same database in clickhouse.url and clickhouse.database (the url names {named!r}, "
                f"database is {data['database']!r})"
            )
        return data

    @field_validator("rollup_minute_retention_days", "rollup_hour_retention_days")
    @classmethod
    def _rollups_outlive_readings(cls, v: int, info: ValidationInfo) -> int:
        raw = info.data.get("retention_days")
        if raw is not None and v < raw:
            raise ValueError(
                f"at least clickhouse.retention_days ({raw}): the rollups are the history once the raw readings expire"
            )
        return v

    @property
    def server_url(self) -> str:
        """``url`` without the database: the HTTP endpoint alone."""
        return re.sub(r"^(https?://[^/]+).*$", r"\1", self.url)

    @property
    def secure(self) -> bool:
        return self.url.startswith("https://")

    def at(self, url: str) -> ClickHouseSettings:
        """These settings pointed at another server ``url`` (a ``--clickhouse`` argument);
        a database in ``url`` replaces ``database``. Raises :class:`ConfigError` for a bad URL."""
        data = self.model_dump()
        data["url"] = url
        data["password"] = self.password.get_secret_value()
        if _url_database(re.sub(r"^(https?://)[^/@]*@", r"\1", url)) is not None:
            del data["database"]
        try:
            return ClickHouseSettings.model_validate(data)
        except ValidationError as exc:
            raise ConfigError("--clickhouse", "http://HOST:PORT or http://HOST:PORT/DATABASE", url) from exc


class IngestSettings(_Section):
    flush_rows: int = Field(2048, ge=1, le=1_000_000, description="readings per stream entry, at most")
    flush_ms: float = Field(5.0, gt=0, le=10_000, description="oldest reading waits at most this long")
    max_inflight_frames: int = Field(
        20_000, ge=16, description="raw frames queued between source and decoder (bounded queue)"
    )
    dlq_maxlen: int = Field(
        1_000_000, ge=1000,
        description="dead-letter stream length bound (Redis trims the oldest past it; stored ones are safe "
        "in dead_letters, and a trimmed one not yet stored shows as a gap in the audit)",
    )
    backoff: BackoffSettings = BackoffSettings()
    fault_crash_after_flush: int = Field(
        0, ge=0, description="testing only: exit(70) right after the Nth write to Redis, before the "
        "upstream acknowledgement (once per Redis keyspace)",
    )


class WriterSettings(_Section):
    consumer: str = Field("", description="consumer name; empty: writer-<hostname>-<pid>")
    batch_rows: int = Field(100_000, ge=1, description="rows per INSERT, at most")
    batch_ms: float = Field(100.0, gt=0, description="a batch waits at most this long for more rows")
    min_batch_ms: float = Field(
        10.0, ge=0, description="at least this long between INSERTs (bounds parts per second); "
        "otherwise a batch is inserted as soon as the streams are drained"
    )
    read_count: int = Field(256, ge=1, description="stream entries per XREADGROUP")
    overlap: bool = Field(
        False, description="read and decode the next batch while one INSERT is in flight (more CPU for "
        "the writer and the engine; it did not lower latency on a 2-core box, docs/performance.md); "
        "false: the loop waits for each INSERT"
    )
    overlap_behind: bool = Field(
        True, description="with overlap off, still read the next batch while an INSERT is in flight when the "
        "loop is behind (its last read filled read_count): a backlog drains with the writer and the engine "
        "working at once; false: only writer.overlap decides"
    )
    claim_idle_ms: int = Field(15_000, ge=100, description="claim entries idle this long from dead writers")
    trim_interval_s: float = Field(1.0, gt=0)
    lag_alert_s: float = Field(5.0, gt=0)
    hop_latency_interval_s: float = Field(10.0, gt=0)
    # capped at 1 s: the backlog in Redis grows by a second of readings for every second the writer
    # sleeps past a recovery, and a probe a second costs ClickHouse nothing
    backoff: BackoffSettings = BackoffSettings(initial_s=0.2, max_s=1.0)
    device_time_max_past_s: float = Field(
        400 * 86400, gt=0, le=6 * 365 * 86400,
        description="a reading whose device time is more than this before its receive time is dead-lettered, "
        "not stored (400 days: buffered and Sparkplug backfill still lands); at most 6 years, so that a batch "
        "stays within ClickHouse's 100 monthly partitions per INSERT",
    )
    device_time_max_future_s: float = Field(
        3600, ge=0, le=365 * 86400,
        description="a reading whose device time is more than this after its receive time is dead-lettered, "
        "not stored; at most 1 year",
    )
    fault_crash_after_insert: int = Field(
        0, ge=0, description="testing only: exit(70) right after the Nth INSERT, before XACK (once per Redis keyspace)"
    )
    fault_crash_after_split_inserts: int = Field(
        0, ge=0,
        description="testing only: exit(70) right after the Nth INSERT of a batch split to find the rows "
        "ClickHouse refused (once per Redis keyspace)",
    )


class MetricsSettings(_Section):
    publish_interval_s: float = Field(1.0, gt=0)
    ttl_s: int = Field(10, ge=2, description="a process's metrics hash expires this long after its last beat")
    prometheus_port: int = Field(
        9108, ge=0, le=65535, description="port of `sensorhub metrics-exporter`'s /metrics; 0: no endpoint"
    )
    prometheus_host: str = "127.0.0.1"
    disk_alert_days: float = Field(
        7.0, gt=0, description="the monitor alerts when ClickHouse's disk is full in fewer days than this at the current rate"
    )
    disk_alert_free_pct: float = Field(5.0, ge=0, le=100, description="... or has less than this share free")


class AlertRule(_Section):
    """One alert rule: which series it watches (globs over device ids and metric names) and what fires it.

    Exactly one condition: ``above`` or ``below`` (a limit on the value),
    ``rate_above`` or ``rate_below`` (change per second over ``window_s``), or
    ``silent_s`` (no reading of a matching metric from a matching device for that
    long). ``clear_at`` is the hysteresis level at which an open alert closes
    (default: the limit itself); ``for_s`` is how long the condition must hold,
    in reading time, before the alert opens.
    """

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    device: str = Field("*", min_length=1, description="glob over device ids")
    metric: str = Field("*", min_length=1, description="glob over metric names")
    above: float | None = None
    below: float | None = None
    rate_above: float | None = Field(None, description="per second, over window_s")
    rate_below: float | None = Field(None, description="per second, over window_s (negative: falling)")
    silent_s: float | None = Field(None, gt=0)
    window_s: float = Field(10.0, gt=0, le=86400, description="span of the rate rules' change")
    clear_at: float | None = None
    for_s: float = Field(0.0, ge=0, le=86400)
    severity: Literal["info", "warning", "critical"] = "warning"

    @model_validator(mode="after")
    def _one_condition(self) -> AlertRule:
        given = [k for k in ALERT_CONDITIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"rule {self.name!r}: exactly one of {', '.join(ALERT_CONDITIONS)} (got "
                + (", ".join(given) if given else "none") + ")"
            )
        kind = given[0]
        limit = getattr(self, kind)
        if kind != "silent_s" and limit != limit:  # NaN
            raise ValueError(f"rule {self.name!r}: {kind} must be a number")
        if kind == "silent_s":
            if self.clear_at is not None or self.for_s:
                raise ValueError(f"rule {self.name!r}: silent_s takes neither clear_at nor for_s")
        elif self.clear_at is not None:
            rising = kind in ("above", "rate_above")
            if (rising and not self.clear_at <= limit) or (not rising and not self.clear_at >= limit):
                raise ValueError(
                    f"rule {self.name!r}: clear_at {'at or below' if rising else 'at or above'} "
                    f"{kind} ({limit}), got {self.clear_at}"
                )
        return self

    @property
    def kind(self) -> str:
        """The condition: ``above``, ``below``, ``rate_above``, ``rate_below`` or ``silent_s``."""
        return next(k for k in ALERT_CONDITIONS if getattr(self, k) is not None)


ALERT_CONDITIONS = ("above", "below", "rate_above", "rate_below", "silent_s")


class AlertsSettings(_Section):
    """Threshold alerts on live readings: rules, the evaluator's bounds, the WebSocket gateway."""

    rules: tuple[AlertRule, ...] = ()
    group: str = Field("alerts", min_length=1, description="the evaluator's consumer group on the reading streams")
    consumer: str = Field("evaluator", min_length=1, description="the evaluator's consumer name (stable across restarts)")
    max_series: int = Field(
        100_000, ge=1, le=10_000_000,
        description="(rule, device, metric) states held in memory; past it the longest-unseen closed ones are dropped",
    )
    rate_samples: int = Field(
        16, ge=2, le=4096,
        description="samples a rate rule keeps per series over window_s; its rate is evaluated on each new one",
    )
    read_count: int = Field(64, ge=1, description="stream entries per XREADGROUP")
    read_interval_ms: float = Field(
        4.0, ge=0, le=1000,
        description="at most one XREADGROUP this often while entries keep coming (each read costs more than "
        "evaluating a block); adds at most this much latency",
    )
    tick_ms: int = Field(200, ge=10, le=10_000, description="how often silent_s rules are checked")
    checkpoint_ms: int = Field(
        1000, ge=50, le=60_000,
        description="state saved and entries acknowledged this often; a restart re-reads at most this much",
    )
    events_maxlen: int = Field(100_000, ge=1000, description="alert events kept in the events stream")
    store_batch: int = Field(1000, ge=1, le=100_000, description="alert events per INSERT into the alerts table")
    store_interval_ms: int = Field(
        1000, ge=0, le=60_000, description="at most one INSERT into the alerts table this often (each is a part)"
    )
    host: str = Field("127.0.0.1", description="address of `sensorhub alerts serve`")
    port: int = Field(8765, ge=1, le=65535, description="port of `sensorhub alerts serve`")
    client_queue: int = Field(
        256, ge=1, le=100_000, description="messages queued for one WebSocket client; a client past it is dropped"
    )
    max_clients: int = Field(1000, ge=1, le=100_000, description="WebSocket clients at once; more are refused")
    history: int = Field(200, ge=0, le=10_000, description="recent events a client may ask for on connect")
    token: SecretStr | None = Field(
        None, description="the page and the WebSocket want it (?token= or Authorization: Bearer); "
        "needed when host is not a loopback address",
    )
    token_file: Path | None = Field(None, description="file holding the token (first line); wins over token")

    _token_file = field_validator("token_file")(_check_secret_file)

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AlertsSettings:
        if self.token is None and self.token_file is None and self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"alerts.token set, to serve alerts on {self.host} (only loopback goes without one)")
        return self

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, v: tuple[AlertRule, ...]) -> tuple[AlertRule, ...]:
        seen: set[str] = set()
        for r in v:
            if r.name in seen:
                raise ValueError(f"rule names must be unique ({r.name!r} twice)")
            seen.add(r.name)
        return v


class SourceSettings(_Section):
    """One named source: its driver and driver options."""

    driver: str = Field(min_length=1)
    symbols: tuple[str, ...] = ()
    endpoint: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


def _default_sources() -> dict[str, SourceSettings]:
    return {"mqtt": SourceSettings(driver="mqtt")}


class Settings(BaseSettings):
    """The whole configuration of one sensorhub process."""

    model_config = SettingsConfigDict(
        env_prefix="SENSORHUB_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    mqtt: MqttSettings = MqttSettings()
    redis: RedisSettings = RedisSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    ingest: IngestSettings = IngestSettings()
    writer: WriterSettings = WriterSettings()
    metrics: MetricsSettings = MetricsSettings()
    dictionary: dict[int, str] = Field(
        default_factory=dict, description="frame metric_id -> metric name; unknown ids are m<id>"
    )
    sources: dict[str, SourceSettings] = Field(default_factory=_default_sources)
    alerts: AlertsSettings = AlertsSettings()

    @field_validator("dictionary")
    @classmethod
    def _valid_dictionary(cls, v: dict[int, str]) -> dict[int, str]:
        for k, name in v.items():
            if not 0 <= k <= 0xFFFF:
                raise ValueError(f"metric id {k} is outside 0..65535")
            if not name:
                raise ValueError(f"metric id {k} has an empty name")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_PATH or os.environ.get("SENSORHUB_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked."""
        masked: dict[str, Any] = _mask(self.model_dump(mode="json"))
        return masked


_CONFIG_PATH: str | None = None
_SECRET_KEYS = {"password", "token"}  # *_file settings are paths, shown as they are


def _mask(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: ("***" if k in _SECRET_KEYS and v else _mask(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_mask(v) for v in obj]
    if isinstance(obj, str):
        return mask_url(obj)
    return obj


def mask_url(url: str) -> str:
    """``url`` with the password of its ``USER:PASSWORD@`` part as ``***``: for screens and logs."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _env_name(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "SENSORHUB_*"
    head = str(loc[0]).upper()
    if len(loc) == 1:
        return f"SENSORHUB_{head}"
    return f"SENSORHUB_{head}_{str(loc[1]).upper()}"


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load settings from defaults, the TOML file, the environment and ``overrides``.

    Raises :class:`ConfigError` naming the first bad key (dotted, with its
    environment variable) and the expected form.
    """
    global _CONFIG_PATH
    if config_file is not None:
        p = Path(config_file)
        if not p.is_file():
            raise ConfigError("--config", "a readable TOML file", str(p))
    _CONFIG_PATH = str(config_file) if config_file is not None else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "(top level)"
        expected = str(err.get("msg", "a valid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            expected = "no such setting (check the spelling)"
        got = err.get("input")
        if isinstance(got, dict | list):
            got = None  # a whole section: it may hold secrets, and the message names the key
        raise ConfigError(f"{key} (env {_env_name(loc)})", expected, got) from None
    except Exception as exc:  # TOML syntax errors and the like
        if type(exc).__name__ in ("TOMLDecodeError",):
            raise ConfigError(str(config_file), f"valid TOML ({exc})") from None
        raise
    finally:
        _CONFIG_PATH = None
