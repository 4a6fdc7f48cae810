"""The checkpoint file format: safe formats only (npz without pickle + a JSON manifest), written crash-safely.

A checkpoint folder holds one sub-folder per save, ``ckpt-<step>-<id>``, and
a ``LATEST`` file naming the newest complete one. A save writes its
sub-folder under a temporary name, renames it to a name no other save uses,
then replaces ``LATEST`` with ``os.replace`` (atomic); only after that are
older saves removed. So a crash at any instant leaves ``LATEST`` naming a
complete checkpoint (the old one or the new one), also when the same step is
saved twice. Tensors are stored whole (not per shard), so a checkpoint
restores into any number of shards. This module only writes and reads
files: :mod:`shardps.store.snapshot` gathers a store's state and loads it back.

Inside: ``manifest.json`` (format version, the store's id, step, optimizer
and its hyperparameters, block size, shard count, keys with shape, dtype and
optimizer step, per shard its version and record of applied pushes, and
``meta``: what the caller stored with it, e.g. how to rebuild the model) and
``arrays.npz`` (``p<i>`` parameters, ``s<i>.<slot>`` optimizer state, ``i`` =
index of the key in the manifest).

Reading trusts nothing in the files: the manifest must be a small regular
file; only the members it names are read, each member's header (dtype,
shape) is checked against the manifest before its data is decompressed, and
the data may not be larger than the manifest says.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import uuid
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shardps.store.dedup import AppliedRecord
from shardps.store.ids import unique
from shardps.store.optim import check_state, optimizer_from_config
from shardps.store.tables import COUNT_SLOTS, TableSpec

FORMAT, VERSION = "shardps-checkpoint", 2  # 2: store id, exact applied-push records (1 is still read)
_LATEST = "LATEST"
_NAME = re.compile(r"^ckpt-\d{8}(-[0-9a-f]{8})?$")
_FLOATS = {np.dtype(t).str for t in (np.float16, np.float32, np.float64)}
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is a few KB per thousand keys
MAX_SHARDS = 1 << 16


def write(path: str | os.PathLike, *, header: dict, params: dict, state: dict, steps: dict, tables: dict,
          keep: int = 2) -> Path:
    """Write one checkpoint under folder ``path``; returns its folder. Blocks until written and synced.

    ``header``: ``{"store", "step", "num_shards", "block_bytes", "optimizer" (config), "shards" (per shard
    ``{"version", "applied"}``), "meta" (the caller's JSON object, optional)}``;
    ``params``/``state``/``steps``: whole tensors by key (state: ``{slot: array}``), in registration order; ``tables``: ``{name: (spec as JSON, rows)}``, rows as
    :func:`shardps.store.placement.gather_rows` gives them. Keeps the newest ``keep`` checkpoints.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    arrays, keys, entries = {}, [], []
    for i, (name, value) in enumerate(params.items()):
        arrays[f"p{i}"] = value
        arrays.update({f"s{i}.{slot}": buf for slot, buf in state[name].items()})
        keys.append({"name": name, "shape": list(value.shape), "dtype": value.dtype.str, "step": int(steps[name])})
    for j, (name, (spec, rows)) in enumerate(tables.items()):
        arrays.update({f"t{j}.{field}": value for field, value in rows.items()})
        entries.append({**spec, "rows": int(len(rows["ids"])), "count_slots": int(len(rows["counts"]))})
    manifest = {"format": FORMAT, "version": VERSION, **header, "step": int(header["step"]), "keys": keys,
                "tables": entries}
    final = root / f"ckpt-{int(header['step']):08d}-{uuid.uuid4().hex[:8]}"  # never an existing name
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write_synced(tmp / "arrays.npz", lambda f: np.savez(f, **arrays))
        _write_synced(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        os.replace(tmp, final)
        _write_synced(root / f".{_LATEST}.{uuid.uuid4().hex}", lambda f: f.write(final.name.encode()),
                      replace=root / _LATEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    others = sorted((p for p in root.iterdir() if _NAME.match(p.name) and p != final), key=lambda p: p.stat().st_mtime)
    for old in others[:max(0, len(others) - (keep - 1))]:  # keep the newest, never the one just written
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_synced(path: Path, write, replace: Path | None = None) -> None:
    """Write ``path`` with ``write(file)``, flushed to disk; then atomically rename it to ``replace`` if given."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if replace is not None:
        os.replace(path, replace)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk
        finally:
            os.close(fd)


def latest(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``path`` (or ``path`` itself if it is one), else None."""
    root = Path(path)
    if (root / "manifest.json").is_file():
        return root
    pointer = root / _LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _NAME.match(name):
        raise ValueError(f"{pointer}: does not name a checkpoint folder: {name[:80]!r}")
    return root / name


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the latest checkpoint under ``path``, checked; reads no arrays. Raises as :func:`read`."""
    return _read_manifest(_folder(path) / "manifest.json")


def _folder(path: str | os.PathLike) -> Path:
    """:func:`latest`, raising ``FileNotFoundError`` where there is none."""
    folder = latest(path)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint in {path} (no {_LATEST} or manifest.json)")
    return folder


def read(path: str | os.PathLike) -> "Checkpoint":
    """Load and check a checkpoint completely: a :class:`Checkpoint` ``(manifest, params, state, tables)``.

    ``params``: name -> array; ``state``: name -> {slot: array}. Nothing is
    unpickled, only the arrays the manifest names are read, and each is
    checked before it is decompressed. Raises ``FileNotFoundError`` (no
    checkpoint) or ``ValueError`` naming the file (corrupt, truncated,
    inconsistent or not a regular file).
    """
    folder = _folder(path)
    arrays_path = folder / "arrays.npz"
    manifest = _read_manifest(folder / "manifest.json")
    slots = optimizer_from_config(manifest["optimizer"]).slots()
    wanted = {}  # member -> (key, shape, dtype)
    for i, key in enumerate(manifest["keys"]):
        for member in [f"p{i}"] + [f"s{i}.{slot}" for slot in slots]:
            wanted[member] = (key["name"], tuple(key["shape"]), np.dtype(key["dtype"]))
    for j, table in enumerate(manifest.get("tables", [])):
        wanted.update(_table_members(j, table))
    stored = _read_arrays(arrays_path, wanted)
    params = {key["name"]: stored[f"p{i}"] for i, key in enumerate(manifest["keys"])}
    state = {key["name"]: {slot: stored[f"s{i}.{slot}"] for slot in slots} for i, key in enumerate(manifest["keys"])}
    tables = {table["name"]: {field[len(f"t{j}."):]: stored[field] for field in _table_members(j, table)}
              for j, table in enumerate(manifest.get("tables", []))}
    _check_values(state, tables, arrays_path)
    return Checkpoint(manifest, params, state, tables)


def _check_values(state: dict, tables: dict, where: Path) -> None:
    """Raise ``ValueError`` naming ``where`` and the entry unless optimizer state and table rows are possible:
    finite, sums of squares >= 0, table ids unique, row step counts and update times >= 0."""
    for key, slots in state.items():
        for slot, values in slots.items():
            if (why := check_state(slot, values)) is not None:
                raise ValueError(f"{where}: optimizer state {slot!r} of key {key!r} {why}")
    for name, rows in tables.items():
        if not np.isfinite(rows["params"]).all():
            raise ValueError(f"{where}: rows of table {name!r} hold NaN or Inf")
        for field in (f for f in rows if f.startswith("slot.")):
            if (why := check_state(field[5:], rows[field])) is not None:
                raise ValueError(f"{where}: optimizer state {field[5:]!r} of table {name!r} {why}")
        for field in ("steps", "touched"):
            if rows[field].size and rows[field].min() < 0:
                raise ValueError(f"{where}: table {name!r}: negative {field}")
        if len(unique(rows["ids"])) != len(rows["ids"]):
            raise ValueError(f"{where}: table {name!r} holds an id twice")


class Checkpoint(NamedTuple):
    """What :func:`read` returns."""

    manifest: dict
    params: dict  # key -> array
    state: dict  # key -> {slot: array}
    tables: dict  # table -> {"ids", "params", "slot.<name>", "steps", "touched", "counts"}: every row, whole


def _table_members(j: int, table: dict) -> dict[str, tuple[str, tuple, np.dtype]]:
    """The arrays of table entry ``j`` and the shape and dtype the manifest promises for each."""
    n, dim, dtype = table["rows"], table["dim"], np.dtype(table["dtype"])
    rows = {"ids": ((n,), np.dtype(np.int64)), "params": ((n, dim), dtype), "steps": ((n,), np.dtype(np.int64)),
            "touched": ((n,), np.dtype(np.int64)), "counts": ((table["count_slots"],), np.dtype(np.uint8)),
            **{f"slot.{slot}": ((n, dim), dtype) for slot in optimizer_from_config(table["optimizer"]).slots()}}
    return {f"t{j}.{field}": (table["name"], shape, dt) for field, (shape, dt) in rows.items()}


def _regular_file(path: Path, limit: int | None = None) -> None:
    """Raise ``ValueError`` unless ``path`` is a regular file (not a FIFO, device, ...) of at most ``limit`` bytes."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if limit is not None and info.st_size > limit:
        raise ValueError(f"{path}: {info.st_size} bytes, more than a manifest can be ({limit})")


def _read_manifest(path: Path) -> dict:
    """The manifest at ``path``, checked (its optimizer too); raises ``ValueError`` naming the file."""
    _regular_file(path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable manifest: {exc}") from exc
    _check_manifest(manifest, path)
    try:
        optimizer_from_config(manifest["optimizer"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{path}: invalid manifest: optimizer {manifest['optimizer']!r:.120}: {exc}") from exc
    return manifest


def _read_arrays(path: Path, wanted: dict[str, tuple[str, tuple, np.dtype]]) -> dict[str, np.ndarray]:
    """The ``wanted`` members of the npz at ``path``, each checked against its (key, shape, dtype) first."""
    _regular_file(path)
    total = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for _, shape, dtype in wanted.values())
    if total > path.stat().st_size:  # members are stored uncompressed (np.savez): data <= the file
        raise ValueError(f"{path}: the manifest declares {total} bytes of arrays, more than the file holds "
                         f"({path.stat().st_size})")
    headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member, (key, shape, dtype) in wanted.items():
                info = archive.NameToInfo.get(member + ".npy")
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if info is None or not nbytes < info.file_size <= nbytes + 4096:  # a .npy header is < 4 KiB
                    raise ValueError(f"array {member} for key {key!r} is missing or not of {shape} {dtype}")
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise ValueError(f"array {member} for key {key!r} is compressed: np.savez writes it plain")
                with archive.open(info) as f:  # the header only: shape, order, dtype
                    read_header = headers.get(np.lib.format.read_magic(f))
                    got = read_header(f) if read_header else None
                if got is None or (got[0], got[2]) != (shape, dtype):
                    raise ValueError(f"array {member} for key {key!r} is not {shape} {dtype} as the manifest says")
                with archive.open(info) as f:
                    out[member] = np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{path}: corrupt, truncated or not matching its manifest: {exc}") from exc
    return out


def _check_manifest(m, where: Path) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``m`` is a well-formed manifest; upgrades format 1 in place."""
    def bad(what):
        raise ValueError(f"{where}: invalid manifest: {what}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        bad(f"not a {FORMAT} manifest")
    if m.get("version") not in (1, VERSION):
        bad(f"format version {m.get('version')!r}, this shardps reads 1 and {VERSION}")
    for field, low, high in (("step", 0, None), ("num_shards", 1, MAX_SHARDS), ("block_bytes", 1, None)):
        value = m.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
            bad(f"{field} = {value!r:.40}")
    if not isinstance(m.get("store", ""), (str, type(None))):
        bad("store id")
    if not isinstance(m.get("optimizer"), dict):
        bad("optimizer missing")
    if not isinstance(m.get("meta", {}), dict):
        bad("meta is not an object")
    shards = m.get("shards", [])
    if not isinstance(shards, list) or len(shards) not in (0, m["num_shards"]) or not all(
            isinstance(s, dict) and _is_count(s.get("version", 0)) for s in shards):
        bad("shards entry")
    for shard in shards:
        if "last_seq" in shard:  # format 1: everything up to the last number was applied
            last = shard.pop("last_seq")
            if not isinstance(last, dict) or not all(isinstance(k, str) and _is_count(v) for k, v in last.items()):
                bad("shards entry")
            shard["applied"] = {client: [seq + 1, []] for client, seq in last.items()}
        try:
            AppliedRecord.from_json(shard.setdefault("applied", {}))
        except ValueError as exc:
            bad(f"shards entry: {exc}")
    tables = m.setdefault("tables", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        bad("tables entry")
    for table in tables:
        _check_table(table, bad)
    keys = m.get("keys")
    if not isinstance(keys, list) or not (keys or tables):
        bad("no keys")
    names = set()
    for entry in [*keys, *tables]:  # one name, one key or table
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or name in names or not _utf8(name):
            bad(f"{'key' if entry in keys else 'table'} entry {str(entry)[:80]}: its name is missing, "
                f"not valid UTF-8 or used twice")
        names.add(name)
    for key in keys:
        shape = key.get("shape")
        if not isinstance(shape, list) or len(shape) > 32 or not all(_is_count(d) and d > 0 for d in shape):
            bad(f"shape of {key['name']!r}: {shape!r:.80}")
        if key.get("dtype") not in _FLOATS:
            bad(f"dtype of {key['name']!r}: {key.get('dtype')!r:.40}")
        if not _is_count(key.get("step")):
            bad(f"step of {key['name']!r}: {key.get('step')!r:.40}")


def _check_table(t: dict, bad) -> None:
    """Raise through ``bad`` unless ``t`` is a table entry this shardps could have written."""
    try:
        spec = TableSpec.from_json(t)
    except ValueError as exc:
        bad(f"table entry {str(t)[:120]}: {exc}")
    if not _is_count(t.get("rows")) or t.get("count_slots") != (0 if spec.min_count == 1 else COUNT_SLOTS):
        bad(f"table {spec.name!r}: rows {t.get('rows')!r:.20} or count_slots {t.get('count_slots')!r:.20} "
            f"(with min_count {spec.min_count}: {0 if spec.min_count == 1 else COUNT_SLOTS})")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can spell
        return False
    return True


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
