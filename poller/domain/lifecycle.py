"""The common batch lifecycle every provider's statuses map onto.

    validating -> in_progress -> finalizing -> completed
    (or failed, expired, or cancelling -> cancelled)

A provider may skip phases (Anthropic has no validating or finalizing); its adapter says which statuses
a batch entered and when (`Snapshot.entered`).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

Status = Literal["validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "expired", "cancelled"]

#: Every common status in lifecycle order.
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
ACTIVE_STATUSES: Final[tuple[Status, ...]] = ("validating", "in_progress", "finalizing", "cancelling")
FINAL_STATUSES: Final[frozenset[str]] = frozenset({"completed", "failed", "expired", "cancelled"})
#: The position detection compares: a batch never moves to a lower rank; all final statuses share the top.
RANK: Final[dict[str, int]] = {s: r for r, s in enumerate(ACTIVE_STATUSES)} | dict.fromkeys(FINAL_STATUSES, 4)
#: Statuses that may be reconstructed between the one last seen and the one seen now, in lifecycle order.
INTERMEDIATE: Final[tuple[Status, ...]] = ("validating", "in_progress", "finalizing", "cancelling")
#: Statuses a batch must have passed through to reach another, whatever its provider stamps: nothing
#: completes or finalizes without running. (Finalizing is never implied: some servers skip it.)
IMPLIED: Final[dict[str, frozenset[str]]] = {
    "completed": frozenset({"in_progress"}),
    "finalizing": frozenset({"in_progress"}),
}
#: Statuses in which a batch can still run out of its completion window.
EXPIRY_WATCHED: Final[frozenset[str]] = frozenset({"validating", "in_progress"})


def is_final(status: str | None) -> bool:
    return status in FINAL_STATUSES


def is_status(value: object) -> bool:
    return value in RANK
