"""The Keel HTTP client (stdlib only: http.client, ssl, json)."""

import email.utils
import http.client
import json
import random
import ssl
import threading
import time
import uuid
from collections.abc import MutableMapping
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple
from urllib.parse import quote, urlencode, urlsplit

from . import __version__
from .errors import (
    KeelError,
    ProtocolError,
    RetriesExhausted,
    TransportError,
    error_from_response,
)
from .types import Aggregate, BatchResult, Event, EventsPage

__all__ = ["Client", "RETRYABLE_STATUSES"]

#: HTTP statuses that say "nothing was done, try again later". Every other error status is a
#: definite answer and is raised at once.
RETRYABLE_STATUSES = frozenset({429, 503})


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """``Retry-After`` as seconds from now: delay-seconds or an HTTP-date; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(int(value))
    try:
        seconds = float(value)
        if seconds >= 0:
            return seconds
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _close_quietly(conn: http.client.HTTPConnection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - closing a broken connection
        pass


class _Attempt:
    """Result of one HTTP exchange."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Client:
    """A client of one Keel server.

    ``url``: ``http://host:port`` or ``https://host:port`` (a path prefix is kept, for a server
    behind a reverse proxy). ``api_key``: sent as ``Authorization: Bearer <key>`` on every
    request. ``ca_cert``: a PEM file of the CA(s) to trust for ``https`` (default: the system
    store); ``ssl_context`` overrides it entirely.

    Retries: a request that fails without a definite answer (connection refused or reset,
    timeout, connection dropped mid-request) or is answered 503/429 is sent again with the SAME
    body, after ``Retry-After`` when the server gives one, else after a jittered exponential
    backoff (``backoff_base * 2**n``, at most ``backoff_max``, half of it random). At most
    ``retries`` retries (``retries + 1`` attempts) and at most ``max_retry_time`` seconds from the
    first attempt to the start of the last one; a ``Retry-After`` beyond that budget ends the
    retries at once. ``timeout`` bounds each attempt's connect and each socket read.

    A client may be shared between threads: each thread keeps its own keep-alive connection.
    """

    def __init__(
        self,
        url: str,
        api_key: Optional[str] = None,
        ca_cert: Optional[str] = None,
        *,
        timeout: float = 30.0,
        retries: int = 8,
        max_retry_time: float = 60.0,
        backoff_base: float = 0.2,
        backoff_max: float = 5.0,
        auto_ids: bool = True,
        ssl_context: Optional[ssl.SSLContext] = None,
        user_agent: Optional[str] = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"url must be http:// or https://, not {url!r}")
        if not parts.hostname:
            raise ValueError(f"url has no host: {url!r}")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.url = url
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self.api_key = api_key
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.max_retry_time = float(max_retry_time)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.auto_ids = auto_ids
        self.user_agent = user_agent or f"keel-client-python/{__version__}"
        self._ssl: Optional[ssl.SSLContext] = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context(cafile=ca_cert)
        elif ca_cert is not None or ssl_context is not None:
            raise ValueError("ca_cert/ssl_context given for a plain http:// url")
        self._local = threading.local()
        self._conns_lock = threading.Lock()
        self._conns: "set[http.client.HTTPConnection]" = set()
        self._sleep = time.sleep  # replaced by tests
        self._rng = random.Random()

    # ------------------------------------------------------------------ public API

    def submit(
        self,
        commands: Iterable[MutableMapping[str, Any]],
        atomic: bool = False,
    ) -> BatchResult:
        """``POST /v1/batches``: commit ``commands`` (dicts as in docs/API.md).

        Every command without an ``id`` gets a fresh UUID4 ``id`` (unless ``auto_ids=False``),
        WRITTEN INTO THE COMMAND DICT before the first attempt, so that every retry — and a
        later resubmission of the same dicts by the caller — carries the same ids and an
        already committed command is answered ``replayed`` instead of being applied twice.

        Returns a :class:`BatchResult` (one :class:`Committed` or :class:`Rejected` per command).
        Raises :class:`~keel_client.ClientError` subclasses on 4xx (never retried),
        :class:`~keel_client.RetriesExhausted` when the retry budget is spent, and
        :class:`~keel_client.TransportError` when a command without an id may have been sent
        (not resent: that could apply it twice).
        """
        cmds: List[MutableMapping[str, Any]] = []
        for i, cmd in enumerate(commands):
            if not isinstance(cmd, MutableMapping):
                if isinstance(cmd, Mapping):
                    cmd = dict(cmd)
                else:
                    raise TypeError(f"commands[{i}] is not a dict: {type(cmd).__name__}")
            if self.auto_ids and cmd.get("id") is None:
                cmd["id"] = str(uuid.uuid4())
            cmds.append(cmd)
        if not cmds:
            raise ValueError("submit needs at least one command")
        ids: List[Optional[str]] = [
            str(c["id"]) if c.get("id") is not None else None for c in cmds
        ]
        payload: Dict[str, Any] = {"commands": [dict(c) for c in cmds]}
        if atomic:
            payload["atomic"] = True
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # Resending a request that may have been received is safe only when every command has
        # an id (the server answers the original outcome instead of applying it again).
        resend_ok = all(cid is not None for cid in ids)
        try:
            attempt, attempts = self._call("POST", "/v1/batches", body, resend_after_send=resend_ok)
            obj = self._json(attempt)
            return BatchResult.from_json(obj, ids, attempts=attempts)
        except KeelError as e:
            e.command_ids = ids
            raise

    def aggregate(self, aggregate_id: str) -> Aggregate:
        """``GET /v1/aggregates/{id}`` (``account:alice``, ``sku:A-17``).
        Raises :class:`~keel_client.NotFound` when it does not exist."""
        path = "/v1/aggregates/" + quote(aggregate_id, safe=":@!$&'()*+,;=-._~")
        attempt, _ = self._call("GET", path, None, resend_after_send=True)
        return Aggregate.from_json(self._json(attempt))

    def events(self, after: int = 0, limit: int = 100) -> EventsPage:
        """``GET /v1/events?after=SEQ&limit=N``: committed events with ``seq > after``."""
        path = "/v1/events?" + urlencode({"after": int(after), "limit": int(limit)})
        attempt, _ = self._call("GET", path, None, resend_after_send=True)
        return EventsPage.from_json(self._json(attempt))

    def iter_events(self, after: int = 0, page_size: int = 1000) -> Iterator[Event]:
        """Every committed event after ``after``, paging ``events`` until the log's end as
        seen by the last page."""
        while True:
            page = self.events(after=after, limit=page_size)
            for ev in page.events:
                yield ev
            if not page.events or page.next_after <= after or page.next_after >= page.last_seq:
                return
            after = page.next_after

    def subscribe(
        self,
        after: int = 0,
        kind: Optional[str] = None,
        aggregate: Optional[str] = None,
        *,
        max_events: Optional[int] = None,
        idle_timeout: float = 60.0,
        reconnect_max: int = 10,
        reconnect_max_time: float = 120.0,
    ) -> "Subscription":
        """Follow the committed log live (``GET /v1/subscribe``, Server-Sent Events).

        Returns a :class:`Subscription`: iterate it to get every :class:`Event` with
        ``seq > after`` (filtered by ``kind``/``aggregate``) exactly once, in order. When the
        server ends the stream (``resume``: ``too_slow``/``shutting_down``) or the connection
        fails, it reconnects with ``Last-Event-ID`` (bounded: ``reconnect_max`` consecutive
        reconnects without a new event, within ``reconnect_max_time`` seconds; then
        :class:`~keel_client.RetriesExhausted`). Stop with ``max_events`` or ``close()``
        (also usable as a context manager). ``idle_timeout``: a stream silent this long
        (not even a comment) is treated as dropped and reopened.
        """
        from .subscribe import Subscription

        return Subscription(
            self,
            after=after,
            kind=kind,
            aggregate=aggregate,
            max_events=max_events,
            idle_timeout=idle_timeout,
            reconnect_max=reconnect_max,
            reconnect_max_time=reconnect_max_time,
        )

    def close(self) -> None:
        """Close the keep-alive connections of every thread. The client stays usable: a later
        request opens a new connection."""
        self._drop_conn()
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close_quietly(conn)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _headers(self, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        h = {"User-Agent": self.user_agent, "Accept": "application/json"}
        if self.api_key is not None:
            h["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            h.update(extra)
        return h

    def _new_conn(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._ssl
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_conn(self.timeout)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.add(conn)
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._conns_lock:
                self._conns.discard(conn)
            _close_quietly(conn)

    def _path(self, path: str) -> str:
        return self._prefix + path

    def _attempt(self, method: str, path: str, body: Optional[bytes]) -> _Attempt:
        """One HTTP exchange. Raises TransportError with ``sent`` telling whether the request
        may have reached the server."""
        conn = self._conn()
        headers = self._headers({"Content-Type": "application/json"} if body is not None else None)
        if conn.sock is None:
            with self._conns_lock:
                self._conns.add(conn)  # again, if close() dropped it
            try:
                conn.connect()
            except ssl.SSLCertVerificationError:
                self._drop_conn()
                raise  # a configuration error, not a transient one
            except (OSError, http.client.HTTPException) as e:
                self._drop_conn()
                raise TransportError(f"cannot connect to {self.url}: {e}", sent=False, cause=e) from e
        try:
            conn.request(method, self._path(path), body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._drop_conn()
            raise TransportError(
                f"{method} {path}: connection failed after sending: {e!r}", sent=True, cause=e
            ) from e
        status = resp.status
        resp_headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self._drop_conn()
            if 400 <= status < 500:
                # The status line is a definite answer even if its body was cut.
                return _Attempt(status, resp_headers, b"")
            raise TransportError(
                f"{method} {path}: connection dropped while reading the HTTP {status} answer: {e!r}",
                sent=True,
                cause=e,
            ) from e
        if resp.will_close:
            self._drop_conn()
        return _Attempt(status, resp_headers, data)

    def _backoff(self, retry_number: int) -> float:
        """Equal-jitter exponential backoff for retry ``retry_number`` (1-based)."""
        cap = min(self.backoff_max, self.backoff_base * (2 ** (retry_number - 1)))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    def _call(
        self, method: str, path: str, body: Optional[bytes], *, resend_after_send: bool
    ) -> Tuple[_Attempt, int]:
        """Send with retries; return the 2xx attempt and the number of attempts made."""
        start = time.monotonic()
        attempts = 0
        maybe_applied = False
        while True:
            attempts += 1
            retry_after: Optional[float] = None
            failure: KeelError
            try:
                att = self._attempt(method, path, body)
            except TransportError as e:
                if e.sent:
                    maybe_applied = True
                    if not resend_after_send:
                        e.outcome_unknown = True
                        raise
                failure = e
            else:
                if 200 <= att.status < 300:
                    if method != "POST":
                        return att, attempts
                    # A 2xx whose body cannot be parsed is indefinite: check it here so that
                    # the retry (same ids) can get a readable answer.
                    try:
                        self._json(att)
                        return att, attempts
                    except ProtocolError as e:
                        maybe_applied = True
                        if not resend_after_send:
                            e.outcome_unknown = True
                            raise
                        failure = e
                else:
                    retry_after = parse_retry_after(att.headers.get("retry-after"))
                    err = error_from_response(att.status, att.body, att.headers, retry_after)
                    if att.status not in RETRYABLE_STATUSES:
                        # A definite answer: raised as is, never retried. It says nothing of
                        # THIS request was committed; an earlier attempt may have been.
                        err.outcome_unknown = maybe_applied
                        raise err
                    failure = err
            # A retryable failure.
            elapsed = time.monotonic() - start
            if attempts > self.retries:
                raise self._exhausted(attempts, failure, maybe_applied, "no retries left")
            delay = retry_after if retry_after is not None else self._backoff(attempts)
            if retry_after is not None:
                # Honour Retry-After (never earlier), spreading clients over 10% more.
                delay = retry_after + self._rng.uniform(0, min(1.0, retry_after * 0.1))
            if elapsed + delay > self.max_retry_time:
                raise self._exhausted(
                    attempts,
                    failure,
                    maybe_applied,
                    f"the next attempt (in {delay:.2f}s) would pass max_retry_time "
                    f"{self.max_retry_time}s",
                )
            self._sleep(delay)

    @staticmethod
    def _exhausted(
        attempts: int, failure: BaseException, maybe_applied: bool, why: str
    ) -> RetriesExhausted:
        state = (
            "the request MAY have been applied (resubmit the same commands: ids make it safe)"
            if maybe_applied
            else "nothing of the request was committed"
        )
        return RetriesExhausted(
            f"gave up after {attempts} attempt(s), {why}; last error: {failure}; {state}",
            attempts=attempts,
            last_error=failure,
            outcome_unknown=maybe_applied,
        )

    @staticmethod
    def _json(att: _Attempt) -> Any:
        try:
            return json.loads(att.body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(
                f"HTTP {att.status} answer is not JSON: {att.body[:200]!r}"
            ) from e

