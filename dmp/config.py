"""All settings in one place, built from the environment (the only reader of os.environ)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dmp.shards import parse_shard

ENV_PREFIX = "DMP_"
SECTIONS = ("kafka", "redis", "ingest", "lookup", "partner", "privacy", "security")


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = "127.0.0.1:19092"
    topic: str = "dmp.events"
    dead_letter_topic: str = "dmp.events.dlq"
    group_id: str = "dmp-ingest"
    partitions: int = 4
    max_batch: int = 5000
    poll_timeout_ms: int = 100
    # Kafka's committed offsets are informational (Redis holds the truth): committed at most
    # this often, all partitions in one request, and at stop or revocation (0: every poll).
    commit_interval_ms: int = 1000
    # Larger than the broker's default so an oversized event reaches us and is dead-lettered.
    fetch_max_bytes: int = 8 * 1024 * 1024
    # A consumer silent this long is out of the group and its partitions move (tests lower it).
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    # PLAINTEXT, SASL_PLAINTEXT, SSL or SASL_SSL (dmp/auth_transport.py; docs/security.md).
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "PLAIN"
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:16379/0"
    key_prefix: str = "dmp"
    change_stream_maxlen: int = 1_000_000
    # Redis Cluster (deploy/redis_cluster.sh): the URL names any one node.
    cluster: bool = False
    # A Redis that stops answering (a network partition drops packets, no reset) fails the
    # call after this long instead of holding ingest, and the rebalances waiting on it, for
    # good. Above any one command's time here (the largest reads are replica snapshots)
    # and above LookupSettings.follow_block_ms (a blocking XREAD waits that long).
    socket_timeout_seconds: float = 30.0
    # A cluster client retries a failed command itself, and a timeout is a failure: against
    # a master that stops answering, each attempt waits the whole socket timeout. redis-py's
    # default of 10 retries held one GET 10 s at a 0.5 s timeout (docs/decisions/0021). Our
    # services retry Redis failures themselves, with backoff, so the client keeps one.
    cluster_retries: int = 1


@dataclass(frozen=True)
class IngestSettings:
    max_event_bytes: int = 64 * 1024
    # Events stamped further ahead than this are refused (clock skew beyond reason).
    max_future_seconds: float = 3600.0
    due_sweep_limit: int = 2000
    metrics_port: int = 0
    # Cookie states each owned partition keeps in memory (dmp/partition_store.py); past it the
    # cache is emptied and refilled from Redis. ~0.7 KB a state with 1,000 segments
    # (docs/decisions/0020). 0: none kept, every batch reads its states from Redis.
    state_cache_size: int = 500_000


@dataclass(frozen=True)
class LookupSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    follow_block_ms: int = 100
    answer_cache_size: int = 100_000
    # How often one replica writes each partition's index to Redis so others start fast (0: never).
    snapshot_interval_seconds: float = 300.0
    # INDEX/COUNT (e.g. 0/2): hold only the partitions p with p % COUNT == INDEX (dmp/shards.py);
    # empty: every partition.
    shard: str = ""


@dataclass(frozen=True)
class PartnerSettings:
    """Partner integration (bidder_adapter): ID sync, match table, enrich, admin."""

    # OpenRTB 2.6 Appendix C: match tables customarily keep entries 14 to 60 days.
    match_ttl_days: int = 30
    match_stream_maxlen: int = 1_000_000
    cookie_name: str = "dmp_uid"
    cookie_max_age_days: int = 390
    cookie_domain: str = ""
    # A bid request whose tmax is below this is answered at once, unenriched.
    min_tmax_ms: int = 10
    max_batch_users: int = 1000
    reload_poll_seconds: float = 2.0
    # Hex SHA-256 of the key for POST /v1/admin/partners/reload; empty disables it.
    admin_key_sha256: str = ""
    destination_state_prefix: str = "dest"
    destinations_metrics_port: int = 0


@dataclass(frozen=True)
class PrivacySettings:
    """Consent checks in ingest and the opt-out / erasure suppression list (dmp/privacy.py)."""

    # off | when_gdpr_applies | always: which events need a TCF v2 consent (docs/security.md).
    consent_policy: str = "when_gdpr_applies"
    # TCF purposes that must all be consented: store on device, build and use ad profiles.
    consent_purposes: str = "1,3,4"
    # Our IAB vendor id; when set, the TC string must also consent to this vendor.
    vendor_id: int = 0
    stream_maxlen: int = 100_000


@dataclass(frozen=True)
class SecuritySettings:
    """Limits and authentication on the lookup app (dmp/auth.py, dmp/limits.py)."""

    # open: GET /v1/users/{uid}/segments needs no key; key: it needs a partner or admin key.
    lookup_auth: str = "open"
    max_body_bytes: int = 1024 * 1024
    max_header_bytes: int = 8 * 1024
    # Requests per second per API key (0: no limit), and the burst allowed above it.
    rate_per_second: float = 0.0
    rate_burst: float = 0.0


@dataclass(frozen=True)
class Settings:
    rules_path: Path = Path("segment_rules/examples/segments.yaml")
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    lookup: LookupSettings = field(default_factory=LookupSettings)
    log_level: str = "INFO"
    log_format: str = "json"  # json (one object per line) or text
    # Several worker processes share metrics through files here (prometheus-client reads it too).
    prometheus_multiproc_dir: Path | None = None
    partners_path: Path | None = None
    partner: PartnerSettings = field(default_factory=PartnerSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read ``DMP_<SECTION>_<NAME>`` (and ``DMP_RULES_PATH``, ``DMP_LOG_LEVEL``) variables.

        Also accepts the short forms ``DMP_KAFKA_BOOTSTRAP`` and ``DMP_REDIS_URL`` that the
        deploy scripts export.
        """
        base = cls()
        top: dict[str, Any] = {}
        if "DMP_RULES_PATH" in environ:
            top["rules_path"] = Path(environ["DMP_RULES_PATH"])
        if "DMP_LOG_LEVEL" in environ:
            top["log_level"] = environ["DMP_LOG_LEVEL"].upper()
        if "DMP_LOG_FORMAT" in environ:
            top["log_format"] = _log_format(environ["DMP_LOG_FORMAT"])
        if environ.get("PROMETHEUS_MULTIPROC_DIR"):
            top["prometheus_multiproc_dir"] = Path(environ["PROMETHEUS_MULTIPROC_DIR"])
        if environ.get("DMP_PARTNERS_PATH"):
            top["partners_path"] = Path(environ["DMP_PARTNERS_PATH"])
        for section in SECTIONS:
            current = getattr(base, section)
            top[section] = _override(current, environ, f"{ENV_PREFIX}{section.upper()}_")
        settings = replace(base, **top)
        # A bad shard is refused at start, with the reason, not at the first lookup.
        parse_shard(settings.lookup.shard, settings.kafka.partitions)
        _check_timeouts(settings)
        for name, count in (
            ("DMP_REDIS_CLUSTER_RETRIES", settings.redis.cluster_retries),
            ("DMP_INGEST_STATE_CACHE_SIZE", settings.ingest.state_cache_size),
        ):
            if count < 0:
                raise ValueError(f"{name}={count}: must be 0 or more")
        return settings


def _check_timeouts(settings: Settings) -> None:
    """A blocking read longer than the socket timeout would fail every time."""
    block = settings.lookup.follow_block_ms / 1000
    if block >= settings.redis.socket_timeout_seconds:
        raise ValueError(
            f"DMP_LOOKUP_FOLLOW_BLOCK_MS={settings.lookup.follow_block_ms}: must stay below"
            f" DMP_REDIS_SOCKET_TIMEOUT_SECONDS={settings.redis.socket_timeout_seconds:g}"
            " (each blocking read would time out)"
        )


def _log_format(raw: str) -> str:
    fmt = raw.strip().lower()
    if fmt not in ("json", "text"):
        raise ValueError(f"DMP_LOG_FORMAT={raw!r}: expected json or text")
    return fmt


def _override(obj: Any, environ: Mapping[str, str], prefix: str) -> Any:
    changes: dict[str, Any] = {}
    for f in fields(obj):
        name = f"{prefix}{f.name.upper()}"
        if name not in environ:
            continue
        raw = environ[name]
        default = getattr(obj, f.name)
        try:
            changes[f.name] = _bool(raw) if isinstance(default, bool) else type(default)(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected {type(default).__name__}") from None
    return replace(obj, **changes)


def _bool(raw: str) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (``bool("0")`` would be true)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def describe(settings: Settings) -> dict[str, Any]:
    """Every setting with its environment variable name, for docs and ``dmp config``."""
    out: dict[str, Any] = {
        "DMP_RULES_PATH": str(settings.rules_path),
        "DMP_LOG_LEVEL": settings.log_level,
        "DMP_LOG_FORMAT": settings.log_format,
        "PROMETHEUS_MULTIPROC_DIR": str(settings.prometheus_multiproc_dir or ""),
        "DMP_PARTNERS_PATH": str(settings.partners_path or ""),
    }
    for section in SECTIONS:
        obj = getattr(settings, section)
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name.endswith("password") and value:
                value = "********"  # `dmp config` output lands in terminals and tickets
            elif f.name == "url" and isinstance(value, str):
                value = _hide_url_password(value)
            out[f"{ENV_PREFIX}{section.upper()}_{f.name.upper()}"] = value
    return out


def _hide_url_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:********@{host}"
