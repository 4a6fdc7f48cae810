"""The Router: the client side of the parameter server.

It knows the layout (which shard holds which range of every key), checks
every request before anything is sent, packs everything bound for one shard
into one message, sends to all involved shards at once and gathers.

Cost of one operation on a tensor split over S shards:
- push: one validation pass (cast + finiteness), one packing copy per shard
  only when its part is several small keys (see :func:`shardps.store.wire.join`),
  one copy into Ray's object store per message; S remote calls in flight
  together; the shard reads the message zero-copy and updates its buffer in
  place.
- pull: S remote calls in flight together; the shard answers with views of
  its buffer, one per key (packed into one array when they are small or
  many: :func:`shardps.store.wire.join`), which Ray copies once into the object
  store; the client reads the answers zero-copy: a key held whole by one
  shard is returned as a read-only view, a split key is assembled with one
  copy into a fresh array.

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

import itertools
import threading
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from operator import itemgetter
from typing import Any, Callable

import numpy as np
import ray

from shardps.store import checkpoint
from shardps.store.dedup import Tag
from shardps.store.errors import ShardUnavailableError
from shardps.store.handle import Handle
from shardps.store.shard.rows import EmbeddingTable
from shardps.store.optim import Adagrad, optimizer_config
from shardps.store.placement import KeySpec, Layout
from shardps.store.initializers import Uniform, initializer_config
from shardps.store.ids import as_ids, segment_sum
from shardps.store.placement import rows_per_shard, shard_of_ids
from shardps.store.wire import INLINE_BYTES, ROWS, all_finite, join, message_bytes, rows_from_wire, split, to_wire

_NUMERIC_KINDS = "biuf"


class Router:
    """Push and pull named numpy arrays to and from sharded parameter actors.

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
        self._client = uuid.uuid4().hex
        self._seq = itertools.count()
        self._pending: OrderedDict[int, Handle] = OrderedDict()  # unfinished pushes by sequence number
        self._lock = threading.RLock()  # a push's number, floor and sending go together
        self._versions: list[int | None] = [None] * len(self._shards)  # last pulled, per shard

    def __getstate__(self):
        state = dict(self.__dict__)
        for private in ("_on_shutdown", "_client", "_seq", "_pending", "_lock", "_versions"):
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
    def layout(self) -> Layout:
        """The placement of every registered key."""
        return self._layout

    def keys(self) -> list[str]:
        """Registered keys, in registration order."""
        return list(self._layout.keys)

    def spec(self, key: str) -> KeySpec:
        """Shape, dtype and placement of one key. Raises ``KeyError``."""
        try:
            return self._layout.keys[key]
        except (KeyError, TypeError):
            raise KeyError(f"unknown key {key!r}; registered keys: {sorted(self._layout.keys)[:20]}") from None

    def placement(self, key: str) -> list[tuple[int, int, int]]:
        """``(shard, start, stop)`` ranges of the flattened ``key``. Raises ``KeyError``."""
        return [(seg.shard, seg.start, seg.stop) for seg in self.spec(key).segments]

    def stats(self) -> list[dict]:
        """Per shard: keys, blocks, bytes, pushes, pulls, version, staleness. Blocks."""
        block = self._layout.partitioner.block_bytes
        stats = self.call_each(lambda shard: shard.stats.remote())
        for shard_stats, groups in zip(stats, self._layout.shard_segments):
            shard_stats["blocks"] = sum(
                -(-seg.size * np.dtype(dt).itemsize // block) for dt, segs in groups.items() for seg in segs
            )
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

    def _check_open(self) -> None:
        """Raise ``ShardUnavailableError`` if this store was shut down (never let Ray start implicitly)."""
        if self._closed or not ray.is_initialized():
            raise ShardUnavailableError("this store was shut down (or Ray was): launch() or restore() a new one")

    def _segments(self, shard: int) -> int:
        """How many key segments ``shard`` holds by this Router's layout (sent along; see ``Tag``)."""
        return sum(len(segs) for segs in self._layout.shard_segments[shard].values())

    # ---- register ------------------------------------------------------
    def register(self, values: Mapping[str, np.ndarray]) -> None:
        """Add new keys with their initial values. Blocks until every shard has them.

        Only the Router that ``launch()`` returned may register (its copies
        would place keys the owner does not know of).

        Raises:
            TypeError: ``values`` is not a mapping of str to arrays.
            ValueError: empty mapping, key already registered or not
                encodable as UTF-8, empty or non-floating array, or NaN/Inf
                (unless ``allow_nonfinite``). Nothing changes.
            RuntimeError: called on a Router copy.
        """
        if not self._owner:
            raise RuntimeError("register() is only allowed on the Router that launch() returned; "
                               "register keys there before copying it to workers")
        self._check_open()
        if not isinstance(values, Mapping) or not values:
            raise ValueError(f"register needs a non-empty dict of name -> array. Received: {values!r:.80}")
        arrays, shapes = {}, {}
        for key, value in values.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"keys must be non-empty strings. Received: {key!r}")
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"key {key!r} cannot be encoded as UTF-8 (lone surrogate?)") from None
            if key in self._layout.keys:
                raise ValueError(f"key {key!r} is already registered")
            arr = np.asarray(value)
            if arr.dtype.kind != "f":
                raise ValueError(f"key {key!r}: parameters must be a floating-point array. Received dtype {arr.dtype}")
            if arr.size == 0:
                raise ValueError(f"key {key!r}: array has no elements (shape {arr.shape})")
            self._check_finite(key, arr)
            arrays[key], shapes[key] = np.ascontiguousarray(arr).reshape(-1), arr.shape
        # placed in the mapping's order: a checkpoint's key order rebuilds exactly this layout on a shard restart
        specs = [self._layout.add(key, shapes[key], arrays[key].dtype) for key in arrays]
        messages: list[dict] = [defaultdict(lambda: ([], [], [])) for _ in self._shards]
        for spec in specs:
            for seg in spec.segments:
                keys, sizes, parts = messages[seg.shard][spec.dtype.str]
                keys.append(spec.name)
                sizes.append(seg.size)
                parts.append(arrays[spec.name][seg.start:seg.stop])
        self.call_each(lambda shard, msg: shard.register.remote(
            {dt: (k, s, to_wire(np.concatenate(p))) for dt, (k, s, p) in msg.items()}), messages)

    def load_optimizer_state(self, state: Mapping[str, Mapping[str, np.ndarray]], steps: Mapping[str, int]) -> None:
        """Set every key's optimizer state (``{key: {slot: array}}``) and step count. Blocks.

        Used by checkpoint restore. Raises ``KeyError``/``ValueError`` before sending anything.
        """
        slots = set(self.optimizer.slots())
        for key in self._layout.keys:
            spec = self.spec(key)
            if set(state[key]) != slots or any(np.shape(a) != spec.shape for a in state[key].values()):
                raise ValueError(f"key {key!r}: optimizer state must have slots {sorted(slots)} of shape {spec.shape}")
        messages = [{dt: (held.state, held.steps)
                     for dt, held in self._layout.state_message(shard, None, state, steps).items()}
                    for shard in range(self.num_shards)]
        self.call_each(lambda shard, message: shard.load_state.remote(message), messages)

    def save(self, path, *, step: int = 0, keep: int = 2):
        """Checkpoint parameters and optimizer state under folder ``path``; see :mod:`shardps.store.checkpoint`.

        Blocks until written; returns the checkpoint's folder. Pushes that
        complete while the shards are being read may or may not be included.
        """
        return checkpoint.save(self, path, step=step, keep=keep)

    # ---- push ----------------------------------------------------------
    def push(self, values: Mapping[str, Any], *, rows: Mapping[str, tuple] | None = None, wait: bool = True,
             timeout: float | None = None):
        """Send updates (gradients) for some keys; each shard applies its part once.

        ``rows``: ``{table: (ids, grads)}``, row gradients for embedding tables
        (as :meth:`push_rows`) sent in the same message as the dense part:
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

    def _send_push(self, call: Callable, shards: list[int], finish: Callable, *,
                   wait: bool, timeout: float | None, client: str | None = None, seq: int | None = None,
                   floor: int | None = None, base_version: int | None = None):
        """Number a push and send ``call(shard, tag)`` to ``shards``, all under the lock; a Handle or its result.

        ``tag``: a :class:`~shardps.store.dedup.Tag`'s fields as a tuple. ``client``/``seq``/``floor``:
        another numbering than this Router's own (sync steps).
        """
        self._check_open()
        with self._lock:
            if seq is None:
                self._forget_finished()
                seq = next(self._seq)
                floor = next(iter(self._pending), seq)  # every push below it has its answer
            own = client is None
            # sent as plain tuples: Ray pickles a NamedTuple by class (a tiny push took 0.04-0.06 ms longer)
            tags = {s: tuple(Tag(client or self._client, seq, floor,
                                 self._versions[s] if base_version is None else base_version, self._segments(s)))
                    for s in shards}
            handle = Handle([call(s, tags[s]) for s in shards], finish, on_done=(lambda: self._done(seq)) if own else None)
            if own:
                self._pending[seq] = handle
        return handle.wait(timeout) if wait else handle

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
                               wait=wait, timeout=timeout, client=f"{self._client}/steps", seq=step, floor=step,
                               base_version=base_version)

    def pack(self, values: Mapping[str, Any], rows: Mapping[str, tuple] | None = None) -> list[dict | None]:
        """Validate ``values`` (and ``rows``, as :meth:`push`) and build one push message per shard
        (``None``: not involved).

        Raises as :meth:`push`; nothing is built unless everything is valid.
        """
        flats = self._validated(values)
        row_parts = self._row_parts(rows or {})
        parts = [defaultdict(list) for _ in self._shards]
        for key, flat in flats.items():
            spec = self._layout.keys[key]
            for seg in spec.segments:
                parts[seg.shard][spec.dtype.str].append((seg.index, flat[seg.start:seg.stop]))
        messages: list[dict | None] = []
        for shard, groups in enumerate(parts):
            msg = {}
            for dt, indexed in groups.items():
                indexed.sort(key=lambda item: item[0])
                everything = len(indexed) == len(self._layout.shard_segments[shard][dt])
                ids = None if everything else to_wire(np.array([i for i, _ in indexed], np.int64))
                msg[dt] = (ids, join([p for _, p in indexed]))
            if row_parts[shard]:
                msg[ROWS] = row_parts[shard]
            messages.append(msg or None)
        return messages

    def _row_parts(self, rows: Mapping[str, tuple]) -> list[dict]:
        """Per shard ``{table: (unique ids, summed grads)}`` of ``rows = {table: (ids, grads)}``; validates all."""
        parts: list[dict] = [{} for _ in self._shards]
        for name, pair in rows.items():
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"rows[{name!r}] must be an (ids, grads) pair. Received: {type(pair).__name__}")
            unique, summed = self._row_grads(self._table_spec(name), *pair)
            for s, mask in self._by_shard(name, unique).items():
                parts[s][name] = (to_wire(unique[mask]), to_wire(summed[mask]))
        return parts

    def _for_replicated(self, messages: list[dict | None]) -> list:
        """With replicas, large messages go into Ray's object store and travel as refs.

        A shard hands the ref on to its replica before fetching it, so both
        download the message at once over their own links instead of one
        after the other (a 100 MB push then costs one transfer, not two).
        """
        if self._replicas is None:
            return messages
        return [ray.put(msg) if msg is not None and message_bytes(msg) > INLINE_BYTES else msg for msg in messages]

    def _validated(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Flat arrays in the registered dtypes; checks keys, shapes, dtypes and finiteness.

        Each key is checked whole, once (one BLAS call per key, not one per
        key and shard: a 10 x 100k push to 4 shards packs in 0.13 ms, 0.15 before).
        """
        if not isinstance(values, Mapping):
            raise TypeError(f"push needs a dict of name -> array. Received: {type(values).__name__}")
        flats = {}
        for key, value in values.items():
            spec = self.spec(key)
            arr = value if type(value) is np.ndarray else np.asarray(value)
            if arr.shape != spec.shape:
                raise ValueError(f"key {key!r}: expected shape {spec.shape}, received {arr.shape}")
            if arr.dtype != spec.dtype:
                if arr.dtype.kind not in _NUMERIC_KINDS or not np.can_cast(arr.dtype, spec.dtype, "same_kind"):
                    raise ValueError(f"key {key!r}: expected dtype {spec.dtype} (or one that casts to it), "
                                     f"received {arr.dtype}")
                with np.errstate(over="ignore"):  # overflow becomes Inf, rejected below
                    arr = arr.astype(spec.dtype)
            flats[key] = arr.reshape(-1)
            self._check_finite(key, flats[key])
        return flats

    def _check_finite(self, key: str, arr: np.ndarray) -> None:
        if not self._allow_nonfinite and not all_finite(arr):
            raise ValueError(f"key {key!r}: contains NaN or Inf (launch with allow_nonfinite=True to accept)")

    # ---- pull ----------------------------------------------------------
    def pull(self, keys: Iterable[str] | str | None = None, *, rows: Mapping[str, Any] | None = None,
             wait: bool = True, timeout: float | None = None):
        """Current values of ``keys`` (all when None) as ``{name: ndarray}``.

        ``rows``: ``{table: ids}``; the answer then also holds, under each
        table's name, its rows for ``ids`` (as :meth:`pull_rows`), fetched in
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
        requests, unpack = self._pull_plan(keys, rows)
        self._check_open()
        asked = [s for s, request in enumerate(requests) if request is not None]
        refs = [self._shards[s].pull.remote((self._segments(s), requests[s])) for s in asked]
        handle = Handle(refs, lambda replies: unpack(asked, replies))
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
        requests, unpack = self._pull_plan(keys, pull_rows)
        asked = [s for s in range(self.num_shards) if messages[s] is not None or requests[s] is not None]
        return self._send_push(lambda s, tag: self._shards[s].push_pull.remote((tag, messages[s], requests[s])),
                               asked, lambda replies: unpack(asked, replies), wait=wait, timeout=timeout)

    def _pull_plan(self, keys, rows: Mapping[str, Any] | None = None) -> tuple[list[dict | None], Callable]:
        """Per-shard pull requests (``None``: not involved) and ``unpack(shards, replies) -> dict``."""
        try:  # a key asked for twice is returned once
            names = self.keys() if keys is None else [keys] if isinstance(keys, str) else list(dict.fromkeys(keys))
        except TypeError:
            raise KeyError(f"keys must be strings. Received: {keys!r:.80}") from None
        specs = [self.spec(name) for name in names]
        wanted = [defaultdict(list) for _ in self._shards]
        for spec in specs:
            for seg in spec.segments:
                wanted[seg.shard][spec.dtype.str].append(seg)
        requests: list[dict | None] = []
        for shard, groups in enumerate(wanted):
            request = {}
            for dt, segs in groups.items():
                segs.sort(key=lambda seg: seg.index)
                everything = len(segs) == len(self._layout.shard_segments[shard][dt])
                request[dt] = None if everything else to_wire(np.array([seg.index for seg in segs], np.int64))
            requests.append(request or None)
        tables = {}  # name -> (spec, unique ids, inverse, {shard: mask})
        for name, ids in (rows or {}).items():
            wanted_ids, inverse = np.unique(as_ids(ids), return_inverse=True)
            tables[name] = (self._table_spec(name), wanted_ids, inverse, self._by_shard(name, wanted_ids))
            for s, mask in tables[name][3].items():
                requests[s] = requests[s] or {}
                requests[s].setdefault(ROWS, {})[name] = to_wire(wanted_ids[mask])

        def unpack(shards: list[int], replies: list) -> dict[str, np.ndarray]:
            # a key held whole by one shard is a zero-copy view of the reply; split keys are assembled
            out = {spec.name: np.empty(spec.shape, spec.dtype) for spec in specs if len(spec.segments) > 1}
            for shard, (version, data) in zip(shards, replies):
                self._versions[shard] = version
                for dt, segs in wanted[shard].items():
                    for seg, part in zip(segs, split(data[dt], np.dtype(dt), [seg.size for seg in segs])):
                        if seg.key in out:
                            out[seg.key].reshape(-1)[seg.start:seg.stop] = part
                        else:
                            out[seg.key] = part.reshape(self._layout.keys[seg.key].shape)
            answer = {name: out[name] for name in names}
            for name, (spec, wanted_ids, inverse, masks) in tables.items():
                mine = [s for s in shards if s in masks]
                answer[name] = _assemble(spec, wanted_ids, inverse, mine, masks,
                                         [replies[shards.index(s)][1][ROWS][name] for s in mine])
            return answer

        return requests, unpack

    # ---- embedding tables --------------------------------------------------
    def register_table(self, name: str, dim: int, *, initializer=None, optimizer=None, dtype=np.float32,
                       min_count: int = 1, max_rows: int | None = None, seed: int = 0) -> None:
        """Add an embedding table: rows of ``dim`` values addressed by int64 ids, placed by a hash of the id.

        Rows are created by the first push of their id (after ``min_count``
        pushes), start at ``initializer``'s value for (seed, name, id)
        (default ``Uniform(-0.05, 0.05)``) and are updated by ``optimizer``
        on the shards (default ``Adagrad(lr=0.05)``; ``SGD``, ``Adam`` with a
        step per row, ``FTRL``). ``max_rows``: at most ceil(max_rows / S) rows
        per shard, the least recently updated go first. Blocks until every
        shard has the table; only the Router that ``launch()`` returned registers.

        Raises:
            ValueError: a name already used by a table or key, or a bad argument.
            RuntimeError: called on a Router copy.
        """
        if not self._owner:
            raise RuntimeError("register_table() is only allowed on the Router that launch() returned")
        self._check_open()
        if not isinstance(name, str) or not name or name in self._layout.keys or name in self._layout.tables:
            raise ValueError(f"table name must be a new non-empty string (not a key or table). Received: {name!r}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"table name {name!r} cannot be encoded as UTF-8") from None
        initializer = Uniform(-0.05, 0.05) if initializer is None else initializer
        optimizer = Adagrad(lr=0.05) if optimizer is None else optimizer
        if np.dtype(dtype).kind != "f":
            raise ValueError(f"Argument `dtype` must be a floating-point type. Received: {dtype!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"Argument `seed` must be an integer >= 0. Received: {seed!r}")
        if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1):
            raise ValueError(f"Argument `max_rows` must be an integer >= 1 or None. Received: {max_rows!r}")
        per_shard = rows_per_shard(max_rows, self.num_shards)
        EmbeddingTable(name, dim, initializer=initializer, optimizer=optimizer, dtype=dtype, seed=seed,
                       min_count=min_count, max_rows=per_shard, count_slots=16)  # checks every argument
        spec = {"name": name, "dim": dim, "dtype": np.dtype(dtype).str, "initializer": initializer_config(initializer),
                "optimizer": optimizer_config(optimizer), "seed": seed, "min_count": min_count, "max_rows": per_shard}
        self.call_each(lambda shard: shard.register_table.remote(spec))
        self._layout.tables[name] = {**spec, "max_rows": max_rows}

    def load_table(self, name: str, rows: dict) -> None:
        """Replace every row of table ``name`` with ``rows`` (a checkpoint's; see :mod:`shardps.store.checkpoint`).

        Each row goes to the shard its id hashes to; admission counters go to
        every shard. Blocks. Raises ``KeyError``/``ValueError`` from the shards.
        """
        self._table_spec(name)
        owner = shard_of_ids(rows["ids"], name, self.num_shards)
        parts = [{k: (v if k == "counts" else v[owner == s]) for k, v in rows.items()} for s in range(self.num_shards)]
        self.call_each(lambda shard, part: shard.load_table.remote(name, part), parts)

    def tables(self) -> dict[str, dict]:
        """Per table: dim, dtype, rows, rows_per_shard, bytes (rows, optimizer state, index), settings. Blocks."""
        stats = self.stats()
        out = {}
        for name, spec in self._layout.tables.items():
            held = [s["tables"].get(name, {"rows": 0, "bytes": 0}) for s in stats]
            out[name] = {"dim": spec["dim"], "dtype": np.dtype(spec["dtype"]), "rows": sum(h["rows"] for h in held),
                         "rows_per_shard": [h["rows"] for h in held], "bytes": sum(h["bytes"] for h in held),
                         "initializer": spec["initializer"], "optimizer": spec["optimizer"],
                         "min_count": spec["min_count"], "max_rows": spec["max_rows"]}
        return out

    def _table_spec(self, name: str) -> dict:
        try:
            return self._layout.tables[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown table {name!r}; tables: {sorted(self._layout.tables)[:20]}") from None

    def _by_shard(self, name: str, ids: np.ndarray) -> dict[int, np.ndarray]:
        """Shard -> boolean mask of ``ids`` (unique) placed there; only shards holding some."""
        owner = shard_of_ids(ids, name, self.num_shards)
        return {s: owner == s for s in np.unique(owner).tolist()}

    def pull_rows(self, name: str, ids, *, wait: bool = True, timeout: float | None = None):
        """Rows of table ``name`` for ``ids`` (1-D ints, duplicates allowed): ``(len(ids), dim)`` array.

        Ids without a row get their initial value; nothing is created. Each
        shard is asked once for its unique ids. ``wait=False`` returns a Handle.

        Raises:
            KeyError: unknown table. TypeError, ValueError: ids not 1-D integers below 2**63.
            TimeoutError, ShardUnavailableError: see :meth:`Handle.wait`.
        """
        handle = self.pull([], rows={name: ids}, wait=False).then(itemgetter(name))
        return handle.wait(timeout) if wait else handle

    def _row_grads(self, spec: dict, ids, grads) -> tuple[np.ndarray, np.ndarray]:
        """Validated ``(unique ids, summed grads)``; raises before anything is sent."""
        ids = as_ids(ids)
        grads = grads if type(grads) is np.ndarray else np.asarray(grads)
        dtype = np.dtype(spec["dtype"])
        if grads.shape != (len(ids), spec["dim"]):
            raise ValueError(f"table {spec['name']!r}: grads must have shape ({len(ids)}, {spec['dim']}). "
                             f"Received {grads.shape}")
        if grads.dtype != dtype:
            if grads.dtype.kind not in _NUMERIC_KINDS or not np.can_cast(grads.dtype, dtype, "same_kind"):
                raise ValueError(f"table {spec['name']!r}: grads must be {dtype} (or cast to it). Received {grads.dtype}")
            with np.errstate(over="ignore"):
                grads = grads.astype(dtype)
        if not all_finite(grads):
            raise ValueError(f"table {spec['name']!r}: grads contain NaN or Inf")
        return segment_sum(ids, grads)  # duplicates summed here: each shard gets unique ids, one array

    def push_rows(self, name: str, ids, grads, *, wait: bool = True, timeout: float | None = None):
        """Push gradients for rows of table ``name``: duplicate ids are summed, then applied once per row.

        Each shard involved gets one message (its unique ids and one
        ``(n, dim)`` array) and applies it exactly once; rows are created as
        described in :meth:`register_table`. Blocking and errors as :meth:`push`
        (KeyError: unknown table; ValueError: grads of the wrong shape or
        dtype, or NaN/Inf; TypeError/ValueError: bad ids).
        """
        return self.push({}, rows={name: (ids, grads)}, wait=wait, timeout=timeout)

    def push_pull_rows(self, name: str, ids, grads, pull_ids, *, wait: bool = True, timeout: float | None = None):
        """Push as :meth:`push_rows`, then pull ``pull_ids`` as :meth:`pull_rows`: one round trip per shard.

        The rows returned include this push.
        """
        handle = self.push_pull({}, [], rows={name: (ids, grads)}, pull_rows={name: pull_ids},
                                wait=False).then(itemgetter(name))
        return handle.wait(timeout) if wait else handle

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


def _assemble(spec: dict, wanted: np.ndarray, inverse: np.ndarray, shards: list[int], masks: dict,
              replies: list) -> np.ndarray:
    """Rows of ``wanted`` from the shards' replies, in the caller's order (``inverse``)."""
    out = np.empty((len(wanted), spec["dim"]), np.dtype(spec["dtype"]))
    for s, rows in zip(shards, replies):
        if s in masks:
            out[masks[s]] = rows_from_wire(rows, out.dtype, spec["dim"])
    return np.take(out, inverse.reshape(-1), axis=0)
