"""Typed results of the Keel API (frozen dataclasses)."""

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional, Union

from .errors import ProtocolError

__all__ = [
    "Committed",
    "Rejected",
    "ItemResult",
    "BatchResult",
    "Aggregate",
    "Event",
    "EventsPage",
    "parse_time",
]


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 UTC timestamp as Keel writes it (``2026-11-21T22:30:00.123456Z``)."""
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    # Python < 3.11 accepts only 3 or 6 fraction digits: pad or cut to 6.
    m = _FRACTION.search(text)
    if m:
        text = text[: m.start(1)] + (m.group(1) + "000000")[:6] + text[m.end(1):]
    return datetime.fromisoformat(text)


_FRACTION = re.compile(r"T\d\d:\d\d:\d\d\.(\d+)")


@dataclass(frozen=True)
class Committed:
    """The command was committed as event ``seq`` (or was committed before: ``replayed``)."""

    seq: int
    replayed: bool = False
    command_id: Optional[str] = None
    status: str = field(default="committed", init=False)

    @property
    def ok(self) -> bool:
        return True


@dataclass(frozen=True)
class Rejected:
    """The command was rejected with a stable ``code``; nothing of it was written."""

    code: str
    message: str
    replayed: bool = False
    command_id: Optional[str] = None
    status: str = field(default="rejected", init=False)

    @property
    def ok(self) -> bool:
        return False


ItemResult = Union[Committed, Rejected]


@dataclass(frozen=True)
class BatchResult:
    """The answer to ``POST /v1/batches``: one result per command, in order."""

    batch: Optional[int]
    committed_at: str
    results: List[ItemResult]
    #: How many HTTP attempts the client made (1 = no retry).
    attempts: int = 1

    @property
    def committed_at_datetime(self) -> datetime:
        return parse_time(self.committed_at)

    @property
    def committed(self) -> List[Committed]:
        return [r for r in self.results if isinstance(r, Committed)]

    @property
    def rejected(self) -> List[Rejected]:
        return [r for r in self.results if isinstance(r, Rejected)]

    @property
    def all_committed(self) -> bool:
        return all(isinstance(r, Committed) for r in self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.results)

    def __getitem__(self, index: int) -> ItemResult:
        return self.results[index]

    @classmethod
    def from_json(
        cls, obj: Any, command_ids: List[Optional[str]], attempts: int = 1
    ) -> "BatchResult":
        if not isinstance(obj, dict) or not isinstance(obj.get("results"), list):
            raise ProtocolError(f"batch answer without `results`: {str(obj)[:200]}")
        items = obj["results"]
        if len(items) != len(command_ids):
            raise ProtocolError(
                f"batch answer has {len(items)} results for {len(command_ids)} commands"
            )
        results: List[ItemResult] = []
        for item, cid in zip(items, command_ids):
            if not isinstance(item, dict):
                raise ProtocolError(f"result is not an object: {str(item)[:200]}")
            status = item.get("status")
            replayed = bool(item.get("replayed", False))
            if status == "committed":
                results.append(Committed(seq=int(item["seq"]), replayed=replayed, command_id=cid))
            elif status == "rejected":
                results.append(
                    Rejected(
                        code=str(item.get("code", "")),
                        message=str(item.get("message", "")),
                        replayed=replayed,
                        command_id=cid,
                    )
                )
            else:
                raise ProtocolError(f"unknown result status {status!r}")
        batch = obj.get("batch")
        return cls(
            batch=int(batch) if batch is not None else None,
            committed_at=str(obj.get("committed_at", "")),
            results=results,
            attempts=attempts,
        )


@dataclass(frozen=True)
class Aggregate:
    """``GET /v1/aggregates/{id}``."""

    id: str
    kind: str
    version: int
    state: Dict[str, Any]

    @classmethod
    def from_json(cls, obj: Any) -> "Aggregate":
        if not isinstance(obj, dict) or "id" not in obj:
            raise ProtocolError(f"aggregate answer without `id`: {str(obj)[:200]}")
        return cls(
            id=str(obj["id"]),
            kind=str(obj.get("kind", "")),
            version=int(obj.get("version", 0)),
            state=dict(obj.get("state") or {}),
        )


@dataclass(frozen=True)
class Event:
    """One committed event (an element of ``GET /v1/events`` ``events``, or one
    ``/v1/subscribe`` message)."""

    seq: int
    batch: int
    committed_at: str
    type: str
    command_id: Optional[str]
    aggregates: List[str]
    data: Dict[str, Any]

    @property
    def committed_at_datetime(self) -> datetime:
        return parse_time(self.committed_at)

    @classmethod
    def from_json(cls, obj: Any) -> "Event":
        if not isinstance(obj, Mapping) or "seq" not in obj:
            raise ProtocolError(f"event without `seq`: {str(obj)[:200]}")
        cid = obj.get("command_id")
        return cls(
            seq=int(obj["seq"]),
            batch=int(obj.get("batch") or 0),
            committed_at=str(obj.get("committed_at", "")),
            type=str(obj.get("type", "")),
            command_id=str(cid) if cid is not None else None,
            aggregates=[str(a) for a in (obj.get("aggregates") or [])],
            data=dict(obj.get("data") or {}),
        )


@dataclass(frozen=True)
class EventsPage:
    """``GET /v1/events``: page on with ``after=next_after`` until ``next_after == last_seq``."""

    events: List[Event]
    next_after: int
    last_seq: int

    @classmethod
    def from_json(cls, obj: Any) -> "EventsPage":
        if not isinstance(obj, dict) or not isinstance(obj.get("events"), list):
            raise ProtocolError(f"events answer without `events`: {str(obj)[:200]}")
        return cls(
            events=[Event.from_json(e) for e in obj["events"]],
            next_after=int(obj.get("next_after", 0)),
            last_seq=int(obj.get("last_seq", 0)),
        )
