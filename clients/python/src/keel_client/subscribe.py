"""``GET /v1/subscribe``: the committed log as Server-Sent Events, with transparent resume."""

import http.client
import json
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Tuple
from urllib.parse import urlencode

from .errors import (
    ApiError,
    ProtocolError,
    RetriesExhausted,
    TransportError,
    error_from_response,
)
from .types import Event

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client

__all__ = ["Subscription", "LINE_BYTES_MAX", "EVENT_BYTES_MAX"]

#: Longest SSE line accepted, and most data bytes of one message.
LINE_BYTES_MAX = 1 << 20
EVENT_BYTES_MAX = 4 << 20


class _StreamEnded(Exception):
    """The stream ended without a ``resume`` message (EOF, reset, idle timeout)."""


class Subscription:
    """An iterator of :class:`~keel_client.Event` from ``/v1/subscribe``.

    Yields every event with ``seq > after`` matching the filters exactly once, in ``seq``
    order, across reconnects: each reconnect asks for ``Last-Event-ID: <last seq seen>``, and
    an event at or below the last seq seen is dropped should a server send it again.

    ``last_seq``: the seq of the last event yielded (``after`` before any). ``reconnects``: how
    many times the stream was reopened. Stop by ``max_events``, ``close()`` (from any thread),
    or leaving a ``with`` block.
    """

    def __init__(
        self,
        client: "Client",
        *,
        after: int = 0,
        kind: Optional[str] = None,
        aggregate: Optional[str] = None,
        max_events: Optional[int] = None,
        idle_timeout: float = 60.0,
        reconnect_max: int = 10,
        reconnect_max_time: float = 120.0,
    ) -> None:
        self._client = client
        self.last_seq = int(after)
        self.kind = kind
        self.aggregate = aggregate
        self.max_events = max_events
        self.idle_timeout = float(idle_timeout)
        self.reconnect_max = int(reconnect_max)
        self.reconnect_max_time = float(reconnect_max_time)
        self.count = 0
        self.reconnects = 0
        #: The ``reason`` of the last ``resume`` message (``too_slow``, ``shutting_down``).
        self.last_resume_reason: Optional[str] = None
        self._closed = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._conn: Optional[http.client.HTTPConnection] = None
        self._resp: Optional[http.client.HTTPResponse] = None
        self._gen = self._run()

    # --------------------------------------------------------------- iterator protocol

    def __iter__(self) -> "Subscription":
        return self

    def __next__(self) -> Event:
        return next(self._gen)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop: the iterator ends (StopIteration) as soon as it notices; callable from any
        thread (it shuts the socket down to wake a blocked read)."""
        self._closed = True
        self._wake.set()
        with self._lock:
            conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._gen.close()  # suspended (caller's thread): runs its cleanup now
        except ValueError:
            pass  # running in another thread: it stops at its next check of `closed`

    # --------------------------------------------------------------- the loop

    def _path(self) -> str:
        q: Dict[str, Any] = {"after": self.last_seq}
        if self.kind is not None:
            q["kind"] = self.kind
        if self.aggregate is not None:
            q["aggregate"] = self.aggregate
        return "/v1/subscribe?" + urlencode(q)

    def _open(self, reconnect: bool) -> http.client.HTTPResponse:
        c = self._client
        conn = c._new_conn(self.idle_timeout)
        with self._lock:
            self._conn = conn
        if self._closed:
            raise _StreamEnded("closed")
        extra = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if reconnect:
            extra["Last-Event-ID"] = str(self.last_seq)
        headers = c._headers(extra)
        try:
            conn.connect()
        except ssl.SSLCertVerificationError:
            raise  # a configuration error: not retried
        except (OSError, http.client.HTTPException) as e:
            raise TransportError(f"subscribe: cannot connect: {e}", sent=False, cause=e) from e
        try:
            conn.request("GET", c._path(self._path()), headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise TransportError(f"subscribe: connection failed: {e!r}", sent=True, cause=e) from e
        with self._lock:
            self._resp = resp
        if resp.status != 200:
            try:
                body = resp.read(64 * 1024)
            except (OSError, http.client.HTTPException):
                body = b""
            from .client import parse_retry_after

            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            raise error_from_response(
                resp.status, body, hdrs, parse_retry_after(hdrs.get("retry-after"))
            )
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "text/event-stream":
            e = ProtocolError(f"subscribe answered Content-Type {ctype!r}, not text/event-stream")
            e.fatal = True  # type: ignore[attr-defined]  # not something a reconnect fixes
            raise e
        return resp

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            resp, self._resp = self._resp, None
        if resp is not None:
            try:
                resp.close()
            except Exception:  # noqa: BLE001
                pass
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _run(self) -> Iterator[Event]:
        c = self._client
        failures = 0  # reconnects since the last new event
        first_failure_at: Optional[float] = None
        reconnect = False
        try:
            while not self._closed:
                if self.max_events is not None and self.count >= self.max_events:
                    return
                delay_hint: Optional[float] = None
                failure: BaseException
                try:
                    resp = self._open(reconnect)
                    for ev in self._messages(resp):
                        if ev is None:
                            continue
                        if ev.seq <= self.last_seq:
                            continue  # already yielded: exactly once
                        self.last_seq = ev.seq
                        self.count += 1
                        failures = 0
                        first_failure_at = None
                        yield ev
                        if self.max_events is not None and self.count >= self.max_events:
                            return
                    raise _StreamEnded("the stream ended without `resume`")
                except _Resume as r:
                    failure = r
                    self.last_resume_reason = r.reason
                    # too_slow: the server is fine, come back at once; shutting_down: give it
                    # time to restart (backoff below).
                    if r.reason == "too_slow" and failures == 0:
                        delay_hint = 0.0
                except ApiError as e:
                    if e.status not in (429, 503):
                        raise  # definite: 401/403/404/400/500...
                    failure = e
                    delay_hint = e.retry_after
                except ProtocolError as e:
                    if getattr(e, "fatal", False):
                        raise
                    failure = e
                except (TransportError, _StreamEnded) as e:
                    failure = e
                except (OSError, http.client.HTTPException) as e:
                    failure = TransportError(f"subscribe: stream failed: {e!r}", sent=True, cause=e)
                finally:
                    self._drop()
                if self._closed:
                    return
                failures += 1
                now = time.monotonic()
                if first_failure_at is None:
                    first_failure_at = now
                if failures > self.reconnect_max:
                    raise RetriesExhausted(
                        f"subscribe: {failures} reconnects without a new event; last: {failure}",
                        attempts=failures,
                        last_error=failure,
                        outcome_unknown=False,
                    )
                delay = delay_hint if delay_hint is not None else c._backoff(failures)
                if now + delay - first_failure_at > self.reconnect_max_time:
                    raise RetriesExhausted(
                        f"subscribe: no new event for {self.reconnect_max_time}s of reconnects; "
                        f"last: {failure}",
                        attempts=failures,
                        last_error=failure,
                        outcome_unknown=False,
                    )
                if delay > 0 and self._wake.wait(delay):
                    return  # closed while waiting
                self.reconnects += 1
                reconnect = True
        finally:
            self._drop()

    def _messages(self, resp: http.client.HTTPResponse) -> Iterator[Optional[Event]]:
        """Parse the SSE stream; yield events, raise _Resume on ``resume``, return at EOF."""
        for etype, data, _eid in _parse_sse(resp):
            if etype in ("event", "message"):
                try:
                    obj = json.loads(data)
                except ValueError as e:
                    raise ProtocolError(f"subscribe: event data is not JSON: {data[:200]!r}") from e
                yield Event.from_json(obj)
            elif etype == "resume":
                reason = None
                resume_after = None
                try:
                    obj = json.loads(data) if data else {}
                    if isinstance(obj, dict):
                        reason = obj.get("reason")
                        resume_after = obj.get("resume_after")
                except ValueError:
                    pass
                raise _Resume(reason, resume_after)
            else:
                yield None  # an event type this client does not know: ignored


class _Resume(Exception):
    def __init__(self, reason: Optional[str], resume_after: Any) -> None:
        self.reason = reason
        self.resume_after = resume_after
        super().__init__(f"server ended the stream: resume ({reason}, resume_after={resume_after})")


def _parse_sse(resp: Any) -> Iterator[Tuple[str, str, Optional[str]]]:
    """The Server-Sent Events parser of the HTML standard: lines ending in LF, CRLF or CR;
    ``:`` comments; ``event``/``data``/``id`` fields; a blank line dispatches. Yields
    ``(event type, data, last event id)``; an unterminated message at EOF is dropped."""
    etype = ""
    data_parts = []
    data_len = 0
    last_id: Optional[str] = None
    pending_cr = False
    while True:
        raw = resp.readline(LINE_BYTES_MAX + 1)
        if not raw:
            return
        if len(raw) > LINE_BYTES_MAX and not raw.endswith(b"\n"):
            raise ProtocolError(f"subscribe: a line longer than {LINE_BYTES_MAX} bytes")
        text = raw.decode("utf-8", "replace")
        if pending_cr and text == "\n":
            pending_cr = False
            continue  # the LF of a CRLF split across reads
        pending_cr = False
        # A lone CR also ends a line: split on it (readline only splits on LF).
        if text.endswith("\r"):
            pending_cr = True
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for line in lines:
            if line == "":
                if data_parts:
                    data = "\n".join(data_parts)
                    yield (etype or "message", data, last_id)
                etype = ""
                data_parts = []
                data_len = 0
                continue
            if line.startswith(":"):
                continue
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "event":
                etype = value
            elif name == "data":
                data_len += len(value)
                if data_len > EVENT_BYTES_MAX:
                    raise ProtocolError(f"subscribe: a message over {EVENT_BYTES_MAX} bytes")
                data_parts.append(value)
            elif name == "id":
                if "\0" not in value:
                    last_id = value
            # "retry" and unknown fields are ignored
