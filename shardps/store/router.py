"""The Router: the client side of the parameter server.

It knows the layout (which shard holds which range of every key), checks
every request before anything is sent, packs everything bound for one shard
into one message, sends to all involved shards at once and gathers.

Cost of one operation on a tensor split over S shards: S remote calls in
flight together. A push costs one validation pass (cast + finiteness), a
packing copy per shard only when its part is several small keys
(:func:`shardps.store.wire.join`) and one copy into Ray's object store per
message; the shard reads it zero-copy and updates its buffer in place. A
pull is answered with views of the shard's buffer, copied once by Ray; a key
held whole by one shard comes back as a read-only view, a split key is
assembled with one copy.

A Router is picklable: a copy sent to a Ray task or actor talks to the same
shards, with its own client id for exactly-once pushes. Only the Router that
``launch()`` returned owns the shards: it alone registers keys, and
``shutdown()`` on a copy does nothing.

A Router is safe to share between threads: a push takes its sequence number
and is sent under one lock, so each shard receives one client's pushes in
order, and the shards' record of applied pushes is exact in any order anyway
(:mod:`shardps.store.dedup`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import numpy as np
import ray

from shardps.store import messages as wire_messages
from shardps.store import snapshot
from shardps.store.dedup import Numbering
from shardps.store.errors import ShardUnavailableError
from shardps.store.handle import RESTART_TIMEOUT_S, Handle, wait_alive
from shardps.store.placement import Layout
from shardps.store.tables import Table, TableSpec, table_stats
from shardps.store.wire import INLINE_BYTES


class Router:
    """Push and pull named numpy arrays and table rows to and from sharded parameter actors.

    Made by :func:`shardps.launch`; use it as a context manager so the shards
    are removed at the end.
    """

    def __init__(self, shards: list, layout: Layout, *, optimizer=None, allow_nonfinite: bool = False,
                 replicas: list | None = None, on_shutdown: Callable[[], None] | None = None,
                 store_id: str | None = None):
        self._shards = list(shards)
        self.store_id = store_id  # written into checkpoints: a restarted shard reloads only its own store's
        self._replicas = None if replicas is None else list(replicas)
        self.optimizer = optimizer
        self._layout = layout
        self._allow_nonfinite = allow_nonfinite
        self._on_shutdown = on_shutdown
        self._owner = on_shutdown is not None  # launch()'s Router: registers keys, removes the shards
        self._closed = False
        self._new_client()

    def _new_client(self) -> None:
        self._numbering = Numbering()  # this client's push numbers (exactly once)
        self._versions: list[int | None] = [None] * len(self._shards)  # last pulled, per shard

    def __getstate__(self):
        state = dict(self.__dict__)
        for private in ("_on_shutdown", "_numbering", "_versions"):
            state.pop(private)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._on_shutdown, self._owner = None, False  # copies never own the shards
        self._new_client()

    # ---- introspection -------------------------------------------------
    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return len(self._shards)

    @property
    def shards(self) -> list:
        """The shard actor handles, in shard order."""
        return list(self._shards)

    @property
    def replicas(self) -> list | None:
        """The replica actor of each shard (``launch(replicas=2)``), else None. Only shards talk to them."""
        return None if self._replicas is None else list(self._replicas)

    @property
    def replicated(self) -> bool:
        """Whether every shard has a replica (``launch(replicas=2)``)."""
        return self._replicas is not None

    @property
    def layout(self) -> Layout:
        """The placement of every registered key and table."""
        return self._layout

    def keys(self) -> list[str]:
        """Registered keys, in registration order."""
        return list(self._layout.keys)

    def placement(self, key: str) -> list[tuple[int, int, int]]:
        """``(shard, start, stop)`` ranges of the flattened ``key``. Raises ``KeyError``."""
        return [(seg.shard, seg.start, seg.stop) for seg in self._layout.spec(key).segments]

    def involved(self) -> list[bool]:
        """Per shard: whether a push of every key and table may reach it (it holds keys, or there are tables)."""
        return [bool(groups or self._layout.tables) for groups in self._layout.shard_segments]

    def stats(self) -> list[dict]:
        """Per shard: keys, blocks, bytes, tables, pushes, pulls, version, staleness, recoveries. Blocks."""
        stats = self.call_each(lambda shard: shard.stats.remote())
        for shard_stats, blocks in zip(stats, self._layout.shard_blocks()):
            shard_stats["blocks"] = blocks
        return stats

    def call_each(self, call: Callable, per_shard: list | None = None) -> list:
        """``call(shard)`` (or ``call(shard, per_shard[i])``, skipping empty items) on every shard at once.

        Blocks (Ray re-sends to a shard that it restarted). Returns the answers in shard order.
        """
        self._check_open()
        if per_shard is None:
            refs = [call(shard) for shard in self._shards]
        else:
            refs = [call(shard, item) for shard, item in zip(self._shards, per_shard) if item]
        return Handle(refs, list).wait()

    def wait_available(self, timeout: float | None = RESTART_TIMEOUT_S) -> None:
        """Block until every shard answers (a shard that Ray is restarting, once it is back).

        Raises ``ShardUnavailableError`` (a shard is gone for good) or ``TimeoutError`` (not back within
        ``timeout`` seconds; ``None`` waits forever).
        """
        for shard in self._shards:
            wait_alive(shard.ping, timeout)

    def _check_open(self) -> None:
        """Raise ``ShardUnavailableError`` if this store was shut down (never let Ray start implicitly)."""
        if self._closed or not ray.is_initialized():
            raise ShardUnavailableError("this store was shut down (or Ray was): launch() or restore() a new one")

    def _check_owner(self, what: str) -> None:
        if not self._owner:
            raise RuntimeError(f"{what}() is only allowed on the Router that launch() returned; "
                               "register there before copying it to workers")

    # ---- register ------------------------------------------------------
    def register(self, values: Mapping[str, np.ndarray]) -> None:
        """Add new keys with their initial values. Blocks until every shard has them.

        Only the Router that ``launch()`` returned may register (its copies
        would place keys the owner does not know of).

        Raises:
            TypeError: ``values`` is not a mapping of str to arrays.
            ValueError: empty mapping, name already used by a key or table or
                not encodable as UTF-8, empty or non-floating array, or
                NaN/Inf (unless ``allow_nonfinite``). Nothing changes.
            RuntimeError: called on a Router copy.
        """
        self._check_owner("register")
        self._check_open()
        arrays = wire_messages.new_values(values, self._layout, allow_nonfinite=self._allow_nonfinite)
        # placed in the mapping's order: a checkpoint's key order rebuilds exactly this layout on a shard restart
        messages = wire_messages.register_messages(self._layout, arrays)
        self.call_each(lambda shard, msg: shard.register.remote(msg), messages)

    def register_table(self, name: str, dim: int, *, initializer=None, optimizer=None, dtype=np.float32,
                       min_count: int = 1, max_rows: int | None = None, seed: int = 0) -> Table:
        """Add an embedding table: rows of ``dim`` values addressed by int64 ids, placed by a hash of the id.

        Rows are created by the first push of their id (after ``min_count``
        pushes), start at ``initializer``'s value for (seed, name, id)
        (default ``Uniform(-0.05, 0.05)``) and are updated by ``optimizer``
        on the shards (default ``Adagrad(lr=0.05)``; ``SGD``, ``Adam`` with a
        step per row, ``FTRL``). ``max_rows``: see :class:`TableSpec`. Blocks
        until every shard has the table; returns its :class:`Table` handle.

        Raises:
            ValueError: a name already used by a table or key, or a bad argument (see :class:`TableSpec`).
            RuntimeError: called on a Router copy.
        """
        self._check_owner("register_table")
        self._check_open()
        given = {k: v for k, v in (("initializer", initializer), ("optimizer", optimizer)) if v is not None}
        spec = TableSpec(name, dim, dtype=dtype, seed=seed, min_count=min_count, max_rows=max_rows, **given)
        if name in self._layout.keys or name in self._layout.tables:
            raise ValueError(f"table name must be new (not a key or table). Received: {name!r}")
        sent = spec.for_shard(self.num_shards)
        self.call_each(lambda shard: shard.register_table.remote(sent))
        self._layout.tables[name] = spec
        return Table(self, name)

    def table(self, name: str) -> Table:
        """The handle of table ``name``. Raises ``KeyError``."""
        return Table(self, name)

    def table_spec(self, name: str) -> TableSpec:
        """The definition of table ``name``. Raises ``KeyError``."""
        return self._layout.table_spec(name)

    def tables(self) -> dict[str, dict]:
        """Per table: dim, dtype, rows, rows_per_shard, bytes (rows, optimizer state, index), settings. Blocks."""
        return table_stats(self._layout.tables, self.stats())

    def save(self, path, *, step: int = 0, keep: int = 2, meta: dict | None = None):
        """Checkpoint parameters, optimizer state and tables under folder ``path``, with ``meta`` (a JSON
        object, read back as ``manifest["meta"]``); see :mod:`shardps.store.snapshot`. Blocks until
        written; returns the checkpoint's folder."""
        return snapshot.save(self, path, step=step, keep=keep, meta=meta)

    # ---- push ----------------------------------------------------------
    def push(self, values: Mapping[str, Any], *, rows: Mapping[str, tuple] | None = None, wait: bool = True,
             timeout: float | None = None):
        """Send updates (gradients) for some keys; each shard applies its part once.

        ``rows``: ``{table: (ids, grads)}``, row gradients for embedding tables
        (as :meth:`Table.push`) sent in the same message as the dense part:
        a shard applies both or, on invalid input, neither.

        With ``wait=True`` blocks until every involved shard applied its part
        and returns None; with ``wait=False`` returns a :class:`Handle`.
        Nothing is sent unless every key, shape, dtype and value is valid.

        Raises:
            KeyError: an unregistered key.
            ValueError: wrong shape, a dtype that cannot be cast to the
                registered one (``same_kind`` casting), or NaN/Inf.
            TimeoutError, ShardUnavailableError: see :meth:`Handle.wait`.
        """
        messages = self._for_replicated(self.pack(values, rows))
        return self._send_push(lambda s, tag: self._shards[s].push.remote((tag, messages[s])),
                               [s for s, msg in enumerate(messages) if msg is not None], lambda replies: None,
                               wait=wait, timeout=timeout)

    def _send_push(self, call: Callable, shards: list[int], finish: Callable, *, wait: bool,
                   timeout: float | None, step: int | None = None, base_version: int | None = None):
        """Number a push and send ``call(shard, tag)`` to ``shards`` (see :class:`~shardps.store.dedup.Numbering`);
        a Handle, or its result. ``tag``: a :class:`~shardps.store.dedup.Tag`'s fields as a plain tuple."""
        self._check_open()

        def send(client: str, seq: int, floor: int, on_done):
            tags = [(client, seq, floor, self._versions[s] if base_version is None else base_version,
                     self._layout.segment_count(s)) for s in shards]
            return Handle([call(s, tag) for s, tag in zip(shards, tags)], finish, on_done=on_done)

        handle = self._numbering.send(send, step=step)
        return handle.wait(timeout) if wait else handle

    def push_mean(self, messages: list[list], *, step: int, base_version: int | None = None,
                  wait: bool = True, timeout: float | None = None):
        """Synchronous training: shard ``s`` applies the mean of ``messages[s]`` as one update.

        ``messages[s]``: the W workers' :meth:`pack` messages for shard ``s``
        (or ObjectRefs to them, which go to the shard unopened); empty lists
        are skipped. ``step`` numbers the update: pushing the same step again
        (a retried step) applies it once. Blocking and errors as :meth:`push`.
        """
        def call(s: int, tag: tuple):
            if self._replicas:  # refs inside a list: the shard hands them to its replica before fetching
                return self._shards[s].push_mean_refs.remote(tag, messages[s])
            return self._shards[s].push_mean.remote(tag, *messages[s])  # Ray resolves refs first

        return self._send_push(call, [s for s, msgs in enumerate(messages) if msgs], lambda acks: None,
                               wait=wait, timeout=timeout, step=step, base_version=base_version)

    def push_mean_pull(self, pairs: list[list], *, step: int, base_version: int | None = None,
                       wait: bool = True, timeout: float | None = None):
        """:meth:`push_mean`, each worker's pull for its next step answered in the same call per shard.

        ``pairs[s]``: per worker ``(pack message for shard s, that shard's
        request of the worker's :meth:`pull_requests` plan)``, or ObjectRefs
        to them (not for replicated shards: use :meth:`push_mean` there).
        The result is, per worker, its replies by shard, for :meth:`pulled`:
        every one reflects this update. Blocking and errors as :meth:`push`.
        """
        if self._replicas:
            raise ValueError("push_mean_pull() is not for replicated shards: use push_mean() and pull()")
        asked = [s for s, msgs in enumerate(pairs) if msgs]

        def per_worker(replies: list) -> list[list]:
            answers = [None] * self.num_shards  # per shard: its answer per worker
            for s, (_, per) in zip(asked, replies):
                answers[s] = per
            workers = len(pairs[asked[0]]) if asked else 0
            return [[None if per is None else per[w] for per in answers] for w in range(workers)]

        return self._send_push(lambda s, tag: self._shards[s].push_mean_pull.remote(tag, *pairs[s]), asked,
                               per_worker, wait=wait, timeout=timeout, step=step, base_version=base_version)

    def pull_requests(self, keys: Iterable[str] | str | None = None, *,
                      rows: Mapping[str, Any] | None = None) -> wire_messages.PullPlan:
        """The per-shard requests of a :meth:`pull` of ``keys`` and ``rows`` (sent by someone else, as
        :meth:`push_mean_pull` does); :meth:`pulled` turns the replies into its result. Raises as :meth:`pull`."""
        return wire_messages.plan_pull(self._layout, keys, rows)

    def pulled(self, plan: wire_messages.PullPlan, replies: list) -> dict:
        """The result of ``plan`` (:meth:`pull_requests`) from the shards' ``replies`` (per shard, None
        where it was not asked), as :meth:`pull` returns it."""
        asked = [s for s, request in enumerate(plan.requests) if request is not None]
        return self._unpack(plan, asked, [replies[s] for s in asked])

    def pack(self, values: Mapping[str, Any], rows: Mapping[str, tuple] | None = None) -> list[tuple | None]:
        """Validate ``values`` (and ``rows``, as :meth:`push`) and build one push message per shard
        (``None``: not involved; the form is :mod:`shardps.store.messages`'s).

        Raises as :meth:`push`; nothing is built unless everything is valid.
        """
        flats = wire_messages.dense_grads(values, self._layout, allow_nonfinite=self._allow_nonfinite)
        return wire_messages.pack_push(self._layout, flats, wire_messages.row_grads(self._layout, rows))

    def _for_replicated(self, messages: list[dict | None]) -> list:
        """With replicas, large messages go into Ray's object store and travel as refs.

        A shard hands the ref on to its replica before fetching it, so both
        download the message at once over their own links instead of one
        after the other (a 100 MB push then costs one transfer, not two).
        """
        if self._replicas is None:
            return messages
        return [ray.put(msg) if msg is not None and wire_messages.message_bytes(msg) > INLINE_BYTES else msg for msg in messages]

    # ---- pull ----------------------------------------------------------
    def pull(self, keys: Iterable[str] | str | None = None, *, rows: Mapping[str, Any] | None = None,
             wait: bool = True, timeout: float | None = None):
        """Current values of ``keys`` (all when None) as ``{name: ndarray}``.

        ``rows``: ``{table: ids}``; the answer then also holds, under each
        table's name, its rows for ``ids`` (as :meth:`Table.pull`), fetched in
        the same message per shard as the dense keys.

        Arrays have the registered shape and dtype and never change after
        they are returned. Like ``ray.get`` of a numpy array, a key held
        whole by one shard comes back as a read-only zero-copy view: copy it
        before writing to it.
        With ``wait=False`` returns a :class:`Handle` whose ``wait()`` gives
        the dict. A shard's part reflects every push it acknowledged before
        the pull reached it.

        Raises:
            KeyError: an unregistered key.
            TimeoutError, ShardUnavailableError: see :meth:`Handle.wait`.
        """
        plan = wire_messages.plan_pull(self._layout, keys, rows)
        self._check_open()
        asked = [s for s, request in enumerate(plan.requests) if request is not None]
        refs = [self._shards[s].pull.remote((self._layout.segment_count(s), plan.requests[s])) for s in asked]
        handle = Handle(refs, lambda replies: self._unpack(plan, asked, replies))
        return handle.wait(timeout) if wait else handle

    def push_pull(self, values: Mapping[str, Any], keys: Iterable[str] | str | None = None, *,
                  rows: Mapping[str, tuple] | None = None, pull_rows: Mapping[str, Any] | None = None,
                  wait: bool = True, timeout: float | None = None):
        """Push ``values`` (and ``rows``, as :meth:`push`), then pull ``keys`` (all when None; and
        ``pull_rows``, as :meth:`pull`'s ``rows``): one round trip per shard.

        Each shard applies its part of the push and answers with its part of
        the pull in the same call, so the values returned include this push.
        Blocking and errors as :meth:`push` and :meth:`pull`.
        """
        messages = self._for_replicated(self.pack(values, rows))
        plan = wire_messages.plan_pull(self._layout, keys, pull_rows)
        asked = [s for s in range(self.num_shards) if messages[s] is not None or plan.requests[s] is not None]
        return self._send_push(
            lambda s, tag: self._shards[s].push_pull.remote((tag, messages[s], plan.requests[s])),
            asked, lambda replies: self._unpack(plan, asked, replies), wait=wait, timeout=timeout)

    def _unpack(self, plan: wire_messages.PullPlan, shards: list[int], replies: list) -> dict:
        """The pull's result; remembers each shard's version (sent with the next push: staleness)."""
        for shard, (version, _) in zip(shards, replies):
            self._versions[shard] = version
        return plan.unpack(shards, replies)

    # ---- lifetime ------------------------------------------------------
    def shutdown(self) -> None:
        """Remove the shards and everything ``launch()`` started. Idempotent; no-op on copies."""
        on_shutdown, self._on_shutdown = self._on_shutdown, None
        if on_shutdown is not None:
            self._closed = True
            on_shutdown()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
