"""Exceptions raised by :mod:`keel_client`.

Hierarchy::

    KeelError
    +-- ApiError                 the server answered with an error status (JSON ``error`` body)
    |   +-- ClientError          4xx: definite, never retried
    |   |   +-- BadRequest       400 (invalid_json, unknown_field, invalid_amount, ...)
    |   |   +-- Unauthorized     401 (missing or unknown API key)
    |   |   +-- Forbidden        403 (the key lacks the scope)
    |   |   +-- NotFound         404 (no such aggregate / route)
    |   +-- ServerError          5xx
    |       +-- ServiceUnavailable   503 (overloaded, shutting_down, engine_poisoned, ...)
    +-- TransportError           no HTTP answer (refused, reset, timeout, dropped connection)
    +-- ProtocolError            an answer that is not what the API promises
    +-- RetriesExhausted         every allowed attempt failed with a retryable failure

``outcome_unknown`` (on every exception raised by ``Client.submit``) is True when an attempt of
the call may have been applied by the server (the request was sent and no definite answer came
back). Resubmitting the SAME commands (they carry the same ``id`` values, which ``submit`` wrote
into them) is then safe: already committed commands are answered ``replayed``.
"""

import json
from typing import Any, Dict, List, Mapping, Optional

__all__ = [
    "KeelError",
    "ApiError",
    "ClientError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "ServerError",
    "ServiceUnavailable",
    "TransportError",
    "ProtocolError",
    "RetriesExhausted",
]


class KeelError(Exception):
    """Base class of every error of this package."""

    #: True when an attempt of this call may have been applied by the server.
    outcome_unknown: bool = False
    #: The command ids of the batch (``submit`` only), in command order.
    command_ids: Optional[List[Optional[str]]] = None


class ApiError(KeelError):
    """The server answered with an HTTP error status.

    ``code`` and ``message`` come from the JSON body ``{"error": {"code": ..., "message": ...}}``;
    they are None when the body is not that JSON (e.g. a bare 400 from the HTTP layer).
    """

    def __init__(
        self,
        status: int,
        code: Optional[str],
        message: Optional[str],
        *,
        retry_after: Optional[float] = None,
        body: bytes = b"",
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.body = body
        self.headers: Dict[str, str] = dict(headers or {})
        text = f"HTTP {status}"
        if code:
            text += f" {code}"
        if message:
            text += f": {message}"
        super().__init__(text)


class ClientError(ApiError):
    """A 4xx answer: the request is wrong; nothing of it was committed. Never retried."""


class BadRequest(ClientError):
    """400."""


class Unauthorized(ClientError):
    """401: no API key, a malformed ``Authorization`` header, or an unknown/revoked key."""


class Forbidden(ClientError):
    """403: the API key lacks the scope the route needs."""


class NotFound(ClientError):
    """404: no such aggregate (``not_found``) or route."""


class ServerError(ApiError):
    """A 5xx answer."""


class ServiceUnavailable(ServerError):
    """503: ``overloaded``, ``shutting_down``, ``read_timeout``, ``engine_poisoned``.

    Nothing of the request was committed. Retried (honouring ``Retry-After``) by the client.
    """


class TransportError(KeelError):
    """No HTTP answer: connection refused or reset, timeout, or the connection dropped.

    ``sent`` is False when the request certainly never reached the server (the connection
    could not be opened); True when it may have been received and processed.
    """

    def __init__(self, message: str, *, sent: bool, cause: Optional[BaseException] = None) -> None:
        self.sent = sent
        self.cause = cause
        super().__init__(message)


class ProtocolError(KeelError):
    """The server's answer does not follow the API (e.g. a 200 whose body is not the JSON
    promised). For a write this is an indefinite outcome: the request may have committed."""


class RetriesExhausted(KeelError):
    """Every attempt failed with a retryable failure (network error, 503, 429) and the
    attempt or time budget is spent. ``last_error`` is the failure of the last attempt,
    ``attempts`` how many were made, ``outcome_unknown`` whether any of them may have been
    applied (False means: certainly nothing of the request was committed)."""

    def __init__(
        self,
        message: str,
        *,
        attempts: int,
        last_error: BaseException,
        outcome_unknown: bool,
        command_ids: Optional[List[Optional[str]]] = None,
    ) -> None:
        self.attempts = attempts
        self.last_error = last_error
        self.outcome_unknown = outcome_unknown
        self.command_ids = command_ids
        super().__init__(message)


_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    503: ServiceUnavailable,
}


def error_from_response(
    status: int, body: bytes, headers: Mapping[str, str], retry_after: Optional[float]
) -> ApiError:
    """Build the typed exception for an HTTP error answer."""
    code: Optional[str] = None
    message: Optional[str] = None
    try:
        parsed: Any = json.loads(body.decode("utf-8")) if body else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        if isinstance(err.get("code"), str):
            code = err["code"]
        if isinstance(err.get("message"), str):
            message = err["message"]
    if message is None and body and code is None:
        message = body[:200].decode("utf-8", "replace")
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ClientError if 400 <= status < 500 else ServerError if status >= 500 else ApiError
    return cls(status, code, message, retry_after=retry_after, body=body, headers=headers)
