"""Injected misbehaviour and request counters, shared by every provider's simulator."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Final, Literal, get_args

FaultKind = Literal["429", "500", "503", "slow", "nonjson", "unknown_status", "html404", "deep_json", "huge_int"]
RouteKind = Literal["create", "retrieve", "list", "cancel"]

ROUTE_KINDS: Final[tuple[str, ...]] = get_args(RouteKind)
FAULT_KINDS: Final[tuple[str, ...]] = get_args(FaultKind)


@dataclass
class Fault:
    """One injected misbehaviour that replaces (or alters) the next `count` matching API responses.

    `429`, `500`, `503`, `nonjson` (an HTML 502 page) and `html404` (a proxy's HTML 404 page) replace
    the response; `slow` delays it by `delay` seconds; `unknown_status` sets every batch's status to
    `status`; `deep_json` answers 200 with JSON nested deeper than any parser's recursion limit;
    `huge_int` sets every batch's creation time to an integer beyond 64 bits.
    """

    kind: FaultKind
    count: int = 1
    retry_after: float | None = None
    delay: float = 1.0
    path_contains: str | None = None
    route: RouteKind | None = None
    status: str = "paused"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
        if self.count < 1:
            raise ValueError("count must be at least 1")
        if self.route is not None and self.route not in ROUTE_KINDS:
            raise ValueError(f"route must be one of {', '.join(ROUTE_KINDS)}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delay and retry_after must not be negative")

    def matches(self, route: str, path: str) -> bool:
        return (self.route is None or self.route == route) and (
            self.path_contains is None or self.path_contains in path
        )


class FaultQueue:
    """Pending faults, oldest first; each matching request takes one use of the first that matches."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def __len__(self) -> int:
        return len(self._faults)

    def add(self, fault: Fault) -> Fault:
        self._faults.append(fault)
        return fault

    def clear(self) -> None:
        self._faults.clear()

    def pending(self) -> list[Fault]:
        return list(self._faults)

    def take(self, route: str, path: str) -> Fault | None:
        for fault in self._faults:
            if fault.matches(route, path):
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None


@dataclass
class SimStats:
    """Requests the API routes received, counted by route kind (faulted and refused ones included)."""

    create: int = 0
    retrieve: int = 0
    list: int = 0
    cancel: int = 0
    faulted: int = 0
    unauthorized: int = 0

    @property
    def total(self) -> int:
        return self.create + self.retrieve + self.list + self.cancel

    def count(self, route: str) -> None:
        setattr(self, route, getattr(self, route) + 1)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}
