"""keel_client: a stdlib-only Python client for the Keel HTTP/JSON API.

    from keel_client import Client
    client = Client("http://127.0.0.1:8080", api_key=None)
    result = client.submit([{"type": "open_account", "account": "alice"}])
    print(result.results[0])            # Committed(seq=1, replayed=False, command_id='...')
    print(client.aggregate("account:alice").state)
"""

__version__ = "0.1.0"

from .client import RETRYABLE_STATUSES, Client, parse_retry_after  # noqa: E402
from .errors import (  # noqa: E402
    ApiError,
    BadRequest,
    ClientError,
    Forbidden,
    KeelError,
    NotFound,
    ProtocolError,
    RetriesExhausted,
    ServerError,
    ServiceUnavailable,
    TransportError,
    Unauthorized,
)
from .subscribe import Subscription  # noqa: E402
from .types import (  # noqa: E402
    Aggregate,
    BatchResult,
    Committed,
    Event,
    EventsPage,
    ItemResult,
    Rejected,
)

__all__ = [
    "__version__",
    "Client",
    "Subscription",
    "RETRYABLE_STATUSES",
    "parse_retry_after",
    "BatchResult",
    "Committed",
    "Rejected",
    "ItemResult",
    "Aggregate",
    "Event",
    "EventsPage",
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
