"""Exactly-once pushes: the tag every push carries and the shard's record of applied ones.

Ray re-sends a call to a shard that died once Ray restarted it
(``max_task_retries``: at least once), and a restarted shard may already
hold the call's effect (copied from its replica). The shard therefore keeps,
per client, an exact record of the sequence numbers it applied:

- ``floor``: every sequence number below it is *finished* -- the client has
  its answer (or gave up on a shard that is gone for good), so it can never
  arrive again except as a duplicate;
- ``above``: the numbers at or above ``floor`` already applied.

The client sends its floor (the lowest sequence number it still waits for)
with every push, so the set above it only holds what is in flight: it stays
as small as the client's window of unacknowledged pushes, whatever the
order in which calls, re-sends and waits happen. (The simpler rule
"anything not above the highest applied is a duplicate" would drop a
re-sent push that a later push had overtaken.)

Clients come and go (every Router copy is one), so a shard keeps the records
of the ``max_clients`` most recently seen clients only: a client silent for
that many others' pushes has nothing in flight any more.
"""
from __future__ import annotations

import itertools
import threading
import uuid
from collections import OrderedDict
from typing import Callable, NamedTuple

MAX_CLIENTS = 1024  # records kept per shard; a Router copy that went quiet is forgotten after this many others
_UNCHECKED = 8  # unfinished pushes a client keeps before asking Ray which have their answers (a call per push
# cost a training worker 6 % of its time); the floor only lags meanwhile: shards remember a few more numbers


class Numbering:
    """A client's side: its id, the numbers of its pushes and the floor below which every push has its answer.

    :meth:`send` numbers a push and sends it under one lock, so each shard
    receives one client's pushes in order (the shards' record is exact in
    any order anyway). ``client``: this client's id (a Router copy makes its own).
    """

    def __init__(self):
        self.client = uuid.uuid4().hex
        self._seq = itertools.count()
        self._pending: OrderedDict = OrderedDict()  # unfinished pushes (Handles) by sequence number
        self._lock = threading.RLock()

    def send(self, send: Callable, *, step: int | None = None):
        """``send(client, seq, floor, on_done)`` under the lock; returns what it returns (a Handle).

        ``step``: number a synchronous training step instead (client
        ``<id>/steps``, seq and floor the step: a retried step is the same push).
        """
        with self._lock:
            if step is not None:
                return send(f"{self.client}/steps", step, step, None)
            if len(self._pending) > _UNCHECKED:
                self._forget_finished()
            seq = next(self._seq)
            floor = next(iter(self._pending), seq)  # every push below it has its answer
            handle = send(self.client, seq, floor, lambda: self._done(seq))
            self._pending[seq] = handle
            return handle

    def _forget_finished(self) -> None:
        """Drop the oldest pushes that have their answers (waited on or not), so the floor moves on."""
        while self._pending:
            seq, handle = next(iter(self._pending.items()))
            if not handle.ready():
                return
            self._pending.pop(seq)

    def _done(self, seq: int) -> None:
        with self._lock:
            self._pending.pop(seq, None)


class Tag(NamedTuple):
    """What a push says about itself (any field may be None).

    client: the Router's id; seq: this push's number for that client; floor:
    the client's lowest unfinished number (see the module doc); base_version:
    the shard version the gradient was computed at (staleness statistics);
    segments: how many segments the client believes the shard holds (a
    restarted shard whose checkpoint lacks keys says so instead of
    misreading the message).
    """

    client: str | None = None
    seq: int | None = None
    floor: int | None = None
    base_version: int | None = None
    segments: int | None = None


class AppliedRecord:
    """Per client: which sequence numbers were applied. Exact, bounded, JSON-serialisable."""

    def __init__(self, max_clients: int = MAX_CLIENTS):
        self._max_clients = max_clients
        self._clients: OrderedDict[str, tuple[int, set[int]]] = OrderedDict()  # client -> (floor, above)

    def is_new(self, client: str, seq: int, floor: int | None) -> bool:
        """True if ``seq`` from ``client`` was not applied yet. Learns ``floor`` on the way."""
        known, above = self._clients.get(client, (0, set()))
        known = max(known, floor or 0)
        self._set(client, known, above)
        return seq >= known and seq not in above

    def add(self, client: str, seq: int) -> None:
        """Record ``seq`` from ``client`` as applied."""
        floor, above = self._clients.get(client, (0, set()))
        above.add(seq)
        self._set(client, floor, above)

    def _set(self, client: str, floor: int, above: set[int]) -> None:
        above.difference_update([s for s in above if s < floor])
        while floor in above:  # the contiguous prefix joins the floor
            above.remove(floor)
            floor += 1
        self._clients[client] = (floor, above)
        self._clients.move_to_end(client)
        while len(self._clients) > self._max_clients:
            self._clients.popitem(last=False)

    def __len__(self) -> int:
        return len(self._clients)

    def to_json(self) -> dict[str, list]:
        """``{client: [floor, [applied numbers above it]]}``, oldest client first."""
        return {client: [floor, sorted(above)] for client, (floor, above) in self._clients.items()}

    @classmethod
    def from_json(cls, data: dict, max_clients: int = MAX_CLIENTS) -> "AppliedRecord":
        """The record :meth:`to_json` wrote. Raises ``ValueError`` for anything else."""
        record = cls(max_clients)
        if not isinstance(data, dict):
            raise ValueError("applied-push record must be a dict")
        for client, entry in data.items():
            if not (isinstance(client, str) and isinstance(entry, list) and len(entry) == 2
                    and _is_int(entry[0]) and isinstance(entry[1], list) and all(map(_is_int, entry[1]))):
                raise ValueError(f"applied-push record of client {str(client)[:40]!r} is malformed")
            record._set(client, entry[0], set(entry[1]))
        return record


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
