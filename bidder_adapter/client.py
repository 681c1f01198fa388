"""An asyncio client for a Python bidder's bid path: enrich a bid request, or ask for a user.

    async with DmpClient(ClientConfig(base_url="http://dmp:8080", api_key=KEY)) as dmp:
        fragment = await dmp.enrich(bid_request)  # {"user": {"data": [...]}} or {}

Never raises and never waits past its deadline: `tmax` (from the call or the request) less
a safety margin. A timeout, a refused connection, an HTTP error or an unreadable answer all
give the empty answer, count against a circuit breaker, and are counted in metrics. While
the breaker is open the client answers empty at once, without touching the network.
Connections are kept alive in one pool (aiohttp), so a call costs one round trip.

Replicas that own id shards are reached through `ShardedDmpClient`
(bidder_adapter/sharded_client.py), one `DmpClient` per shard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import quote

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bidder_adapter.breaker import STATE_VALUES, CircuitBreaker
from dmp.metrics import OUTCOME_HEADER

log = logging.getLogger(__name__)
Outcome = Literal["ok", "empty", "timeout", "error", "circuit_open", "no_time", "misdirected"]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "ok",
    "empty",
    "timeout",
    "error",
    "circuit_open",
    "no_time",
    "misdirected",
)
MISDIRECTED = 421
CLIENT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    api_key: str
    margin_ms: float = 5.0  # kept back from tmax for our own work after the answer
    default_tmax_ms: float = 50.0  # when neither the call nor the request gives tmax
    failure_threshold: int = 5
    reset_after_seconds: float = 5.0
    pool_size: int = 64
    keepalive_seconds: float = 30.0


@dataclass(frozen=True)
class ClientMetrics:
    calls: Counter
    seconds: Histogram
    circuit: Gauge
    shard_circuit: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> ClientMetrics:
        r = registry or CollectorRegistry()
        calls = Counter(
            "dmp_client_calls_total",
            "Calls by outcome: ok, empty (nothing for this user), timeout, error, "
            "circuit_open (not sent), no_time (deadline already past), misdirected (a shard "
            "replica named another shard: a routing error, answered 421).",
            ["outcome"],
            registry=r,
        )
        for outcome in OUTCOMES:
            calls.labels(outcome)
        return cls(
            calls=calls,
            seconds=Histogram(
                "dmp_client_call_duration_seconds",
                "Time of calls that went out, whatever their outcome.",
                buckets=CLIENT_BUCKETS,
                registry=r,
            ),
            circuit=Gauge("dmp_client_circuit_state", "0 closed, 1 half-open, 2 open.", registry=r),
            shard_circuit=Gauge(
                "dmp_client_shard_circuit_state",
                "Per shard of a ShardedDmpClient: 0 closed, 1 half-open, 2 open.",
                ["shard"],
                registry=r,
            ),
        )


class _BadAnswer(Exception):
    pass


@dataclass(frozen=True)
class Misdirected:
    """A shard replica's 421: the cookie lives in shard ``shard`` (None: unreadable)."""

    shard: int | None


@dataclass(frozen=True)
class Answer:
    """A call's decoded JSON (or Misdirected, or None) and the server's X-Dmp-Outcome."""

    doc: object
    outcome: str | None = None


class DmpClient:
    def __init__(
        self, config: ClientConfig, metrics: ClientMetrics | None = None, *, shard: str = ""
    ) -> None:
        self.config = config
        self.metrics = metrics or ClientMetrics.create()
        self.breaker = CircuitBreaker(config.failure_threshold, config.reset_after_seconds)
        # One breaker per shard, each with its own gauge; a lone client keeps the plain one.
        self._circuit = self.metrics.shard_circuit.labels(shard) if shard else self.metrics.circuit
        self._base = config.base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {config.api_key}"}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DmpClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.config.pool_size, keepalive_timeout=self.config.keepalive_seconds
            )
            self._session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def budget(self, tmax_ms: float | None, request: object = None) -> float:
        """Seconds we may spend: tmax (the call's, else the request's) less the margin."""
        if tmax_ms is None and isinstance(request, Mapping):
            value = request.get("tmax")
            if isinstance(value, int | float) and not isinstance(value, bool):
                tmax_ms = float(value)
        if tmax_ms is None:
            tmax_ms = self.config.default_tmax_ms
        return (tmax_ms - self.config.margin_ms) / 1000.0

    async def enrich(
        self,
        request: Mapping[str, Any] | bytes,
        *,
        tmax_ms: float | None = None,
        uid: str | None = None,
    ) -> dict[str, Any]:
        """Our `{"user": {"data": [...]}}` fragment for this bid request, or `{}`.

        ``uid``: our cookie id, when the caller keeps the match table itself.
        """
        body = encode_request(request)
        if body is None:
            self.count("error")
            return {}
        parsed = None if isinstance(request, bytes) else request
        doc = await self.call("POST", enrich_path(uid), body, self.budget(tmax_ms, parsed))
        return doc if isinstance(doc, dict) else {}

    async def segments(
        self, user_id: str, *, id_type: str = "cookie", tmax_ms: float | None = None
    ) -> list[str]:
        """The partner's segment ids for one user (our cookie id or their buyeruid), or []."""
        doc = await self.call("GET", user_path(user_id, id_type), None, self.budget(tmax_ms))
        return partner_ids(doc)

    async def segments_batch(
        self, user_ids: Sequence[str], *, id_type: str = "cookie", tmax_ms: float | None = None
    ) -> dict[str, list[str]]:
        """Each user's partner segment ids (at most the server's batch size), [] if unknown."""
        doc = await self.call(
            "POST", BATCH_PATH, batch_body(user_ids, id_type), self.budget(tmax_ms)
        )
        return batch_answers(user_ids, doc)

    async def call(self, method: str, path: str, body: bytes | None, budget: float) -> object:
        """The decoded JSON answer, a Misdirected, or None after counting why there is none."""
        return (await self.call_answer(method, path, body, budget)).doc

    async def call_answer(
        self,
        method: str,
        path: str,
        body: bytes | None,
        budget: float,
        *,
        expected_owners: Collection[int] = (),
    ) -> Answer:
        """As `call`, with the outcome header. A 421 naming one of ``expected_owners`` was
        asked for on purpose (bidder_adapter/sharded_enrich.py puts another shard's cookie
        in some requests): an answer, counted as empty, not as a routing error."""
        if budget <= 0:
            self.count("no_time")
            return Answer(None)
        if not self.breaker.allow():
            self.count("circuit_open")
            return Answer(None)
        await self.start()
        assert self._session is not None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(budget):
                async with self._session.request(
                    method, self._base + path, data=body, headers=self._headers
                ) as response:
                    raw = await response.read()
                    status = response.status
                    outcome = response.headers.get(OUTCOME_HEADER)
                    if status == MISDIRECTED:
                        # A healthy server that is the wrong shard: not a failure of it.
                        self.breaker.success()
                        self.metrics.seconds.observe(time.perf_counter() - started)
                        owner = _owner(raw)
                        self.count("empty" if owner in expected_owners else "misdirected")
                        return Answer(Misdirected(owner), outcome)
                    if status != 200:
                        raise _BadAnswer(f"HTTP {status}")
            doc = orjson.loads(raw)
        except TimeoutError:
            self._failed("timeout", started)
            return Answer(None)
        except (aiohttp.ClientError, orjson.JSONDecodeError, _BadAnswer, OSError) as exc:
            log.debug("dmp call failed: %s", exc)
            self._failed("error", started)
            return Answer(None)
        self.breaker.success()
        self.metrics.seconds.observe(time.perf_counter() - started)
        self.count("ok" if doc else "empty")
        return Answer(doc, outcome)

    def _failed(self, outcome: Outcome, started: float) -> None:
        self.breaker.failure()
        self.metrics.seconds.observe(time.perf_counter() - started)
        self.count(outcome)

    def count(self, outcome: Outcome) -> None:
        self.metrics.calls.labels(outcome).inc()
        self._circuit.set(STATE_VALUES[self.breaker.state])


BATCH_PATH = "/v1/partner/segments/batch"


def enrich_path(uid: str | None) -> str:
    path = "/v1/openrtb/enrich?mode=fragment"
    return path if uid is None else f"{path}&uid={quote(uid, safe='')}"


def user_path(user_id: str, id_type: str) -> str:
    return f"/v1/partner/users/{quote(user_id, safe='')}/segments?id_type={quote(id_type)}"


def encode_request(request: Mapping[str, Any] | bytes) -> bytes | None:
    try:
        return request if isinstance(request, bytes) else orjson.dumps(request)
    except TypeError:
        return None


def batch_body(user_ids: Sequence[str], id_type: str) -> bytes:
    return orjson.dumps({"users": [{"id": u, "id_type": id_type} for u in user_ids]})


def partner_ids(doc: object) -> list[str]:
    """The segment ids of one user's answer, in either output format (ids or OpenRTB data)."""
    if not isinstance(doc, dict):
        return []
    if isinstance(doc.get("segments"), list):
        return [s for s in doc["segments"] if isinstance(s, str)]
    ids: list[str] = []
    for data in doc.get("data", []) if isinstance(doc.get("data"), list) else []:
        for segment in data.get("segment", []) if isinstance(data, dict) else []:
            if isinstance(segment, dict) and isinstance(segment.get("id"), str):
                ids.append(segment["id"])
    return ids


def batch_answers(user_ids: Sequence[str], doc: object) -> dict[str, list[str]]:
    """Every asked user's ids; a user missing from the answer (or no answer) gets []."""
    out: dict[str, list[str]] = {u: [] for u in user_ids}
    users = doc.get("users") if isinstance(doc, dict) else None
    for item in users if isinstance(users, list) else []:
        if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"] in out:
            out[item["id"]] = partner_ids(item)
    return out


def _owner(raw: bytes) -> int | None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    shard = doc.get("shard") if isinstance(doc, dict) else None
    return shard if isinstance(shard, int) and not isinstance(shard, bool) else None
