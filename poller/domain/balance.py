"""How replicas share the sources between them: pure, from a snapshot of the lease table and `now`.

Every replica holds a membership lease (`replica:<name>`) besides the leases of the sources it polls,
all in the same table, so each sees how many replicas are alive without any other channel. Each keeps
at most its fair share (sources / live replicas, the remainder going to the first names in order, so
the shares add up to every source) and takes free sources up to it; a replica over its share (one
joined) gives up the excess, which a replica under it takes at its next round.

Which sources a replica prefers is rendezvous hashing (highest random weight) of (replica, source):
stable while the membership is, different between replicas, so they rarely race for the same free
source and a join or a leave moves only about 1/n of the sources.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: The lease-table key of a replica's membership (source names cannot contain ':').
MEMBER_PREFIX = "replica:"


def member_key(replica: str) -> str:
    return MEMBER_PREFIX + replica


@dataclass(frozen=True, slots=True)
class LeasePlan:
    """What a replica does this round: `acquire` takes or renews (its membership first), `release` gives up."""

    acquire: tuple[str, ...]
    release: tuple[str, ...]
    replicas: int
    share: int


def rank(replica: str, source: str) -> int:
    """The rendezvous weight of `source` for `replica` (higher is preferred)."""
    digest = hashlib.blake2b(f"{replica}\0{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def live_replicas(me: str, table: Mapping[str, tuple[str, float]], now: float) -> set[str]:
    """The replicas whose membership has not expired, `me` included."""
    alive = {holder for key, (holder, until) in table.items() if key.startswith(MEMBER_PREFIX) and until > now}
    return alive | {me}


def plan(me: str, sources: Sequence[str], table: Mapping[str, tuple[str, float]], now: float) -> LeasePlan:
    """This round's plan for replica `me`, given the configured `sources` and the lease `table`
    (key -> (holder, expires_at), expired rows included)."""
    replicas = sorted(live_replicas(me, table, now))
    base, extra = divmod(len(sources), len(replicas))
    share = base + (1 if replicas.index(me) < extra else 0)  # the shares add up to every source
    held: dict[str, str] = {s: table[s][0] for s in sources if s in table and table[s][1] > now}
    prefer = sorted(sources, key=lambda s: rank(me, s), reverse=True)
    mine = [s for s in prefer if held.get(s) == me]
    keep, give_up = mine[:share], mine[share:]
    free = [s for s in prefer if s not in held]
    take = free[: max(share - len(keep), 0)]
    return LeasePlan((member_key(me), *keep, *take), tuple(give_up), len(replicas), share)
