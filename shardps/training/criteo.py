"""Criteo display-ads click logs: files in, arrays out, categorical values as int64 ids.

The format (Criteo Kaggle and Terabyte): one example per line, 40 tab-separated
fields, no header: a label (0 or 1), 13 integer features, 26 categorical
features written as 8 hex digits; any feature may be empty (missing).

- **Files**: one file, a glob or a folder (every file in it, sorted); ``.gz``
  files are decompressed on the fly. Parsed by pyarrow (C++): whole, into
  numpy arrays (:func:`read`), or block by block by Ray Data tasks
  (:func:`dataset`, what ``shardps train --dataset criteo`` reads).
- **Integers** become float32 ``log(1 + x)`` for ``x > 0``; ``0``, negative
  values and missing ones become 0.
- **Categoricals** become int64 ids with :func:`categorical_ids`.
- **Malformed lines** (not 40 fields, a label other than 0/1, an integer
  feature that is not an integer) raise ``ValueError`` naming the file and
  line, or with ``skip_malformed=True`` are left out and counted.
"""
from __future__ import annotations

import glob
import gzip
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)
NUM_DENSE, NUM_CATEGORICAL = 13, 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CATEGORICAL
MISSING_BASE = 1 << 61  # a missing value of field f: MISSING_BASE + f
HASHED_BIT = 1 << 62  # other strings: HASHED_BIT | (xxh64(value, seed=f) & HASH_MASK)
HASH_MASK = HASHED_BIT - 1
_INTEGER = r"^-?[0-9]+$"
_PARSER_ERROR = re.compile(r"ValueError: (\S.*?:[0-9]+: .*)")  # "<file>:<line>: <why>" in a task's traceback
_HEX = np.full(256, -1, np.int64)  # ASCII byte -> its hex digit's value, -1 for other bytes
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def categorical_ids(values, field: int) -> np.ndarray:
    """int64 ids of one categorical field's values, reproducible anywhere from this formula:

    - 8 hex digits (either case): ``(field << 32) | int(value, 16)``, below ``2**37``:
      distinct values of a field never collide;
    - missing (empty or null): ``2**61 + field``;
    - any other string: ``2**62 | (xxh64(utf8 bytes, seed=field) & (2**62 - 1))``.

    ``values``: a pyarrow string/binary array, or anything ``pyarrow.array``
    takes (a numpy or Python sequence of str, bytes or None). Vectorised:
    only strings that are not 8 hex digits are hashed one by one.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(field, (int, np.integer)) or not 0 <= field < 1 << 29:
        raise ValueError(f"Argument `field` must be an integer in [0, 2**29). Received: {field!r}")
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_string(arr.type) or pa.types.is_binary(arr.type) or pa.types.is_null(arr.type)):
        raise TypeError(f"categorical values must be strings or bytes. Received type {arr.type}")
    arr = pc.fill_null(arr.cast(pa.binary()), b"")
    offsets = np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4).astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.empty(0, np.uint8)
    lengths = np.diff(offsets)
    ids = np.full(len(arr), MISSING_BASE + field, np.int64)
    eight = np.flatnonzero(lengths == 8)
    digits = _HEX[data[offsets[eight, None] + np.arange(8)]] if len(eight) else np.empty((0, 8), np.int64)
    is_hex = (digits >= 0).all(axis=1)
    ids[eight[is_hex]] = (field << 32) | (digits[is_hex] << (4 * np.arange(7, -1, -1))).sum(axis=1)
    other = np.setdiff1d(np.flatnonzero(lengths > 0), eight[is_hex], assume_unique=True)
    if len(other):
        import xxhash

        raw = data.tobytes()
        ids[other] = [HASHED_BIT | (xxhash.xxh64_intdigest(raw[offsets[i]:offsets[i + 1]], seed=field) & HASH_MASK)
                      for i in other.tolist()]
    return ids


class Clicks(NamedTuple):
    """Parsed examples: ``label`` float32 (n,), ``dense`` float32 (n, 13), ``ids`` int64 (n, 26)."""

    label: np.ndarray
    dense: np.ndarray
    ids: np.ndarray
    skipped: int  # malformed lines left out (skip_malformed=True)


def files(path: str | os.PathLike) -> list[Path]:
    """The files ``path`` names: itself, the files a glob matches, or a folder's files, sorted.

    Raises ``FileNotFoundError`` (nothing there) or ``ValueError`` (a folder or glob without files).
    """
    text = str(path)
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(text) if Path(p).is_file())
        if not found:
            raise ValueError(f"no files match {text!r}")
        return found
    p = Path(text)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        if not found:
            raise ValueError(f"the folder {text!r} holds no files")
        return found
    if not p.is_file():
        raise FileNotFoundError(f"no Criteo file at {text!r}")
    return [p]


def read(path: str | os.PathLike, *, skip_malformed: bool = False) -> Clicks:
    """Every example in the file(s) at ``path``, in file order. Blocks while reading.

    Raises ``FileNotFoundError``/``ValueError`` (see :func:`files`), and
    ``ValueError`` naming the file and line for a malformed line (unless
    ``skip_malformed``) or for a file with no example.
    """
    parts = [_read_file(f, skip_malformed) for f in files(path)]
    clicks = Clicks(np.concatenate([p.label for p in parts]), np.concatenate([p.dense for p in parts]),
                    np.concatenate([p.ids for p in parts]), sum(p.skipped for p in parts))
    if not len(clicks.label):
        raise ValueError(f"{path}: no valid examples ({clicks.skipped} malformed lines left out)")
    return clicks


def _read_file(path: Path, skip_malformed: bool) -> Clicks:
    import pyarrow as pa
    from pyarrow import csv

    bad_rows = []

    def on_invalid_row(row) -> str:
        bad_rows.append(row)
        return "skip" if skip_malformed else "error"

    try:
        table = csv.read_csv(path, read_options=csv.ReadOptions(column_names=_NAMES),
                             parse_options=csv.ParseOptions(delimiter="\t", quote_char=False,
                                                            invalid_row_handler=on_invalid_row),
                             convert_options=csv.ConvertOptions(column_types=dict.fromkeys(_NAMES, pa.string()),
                                                                strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        if "Empty CSV file" in str(exc):
            raise ValueError(f"{path}: no examples (an empty file)") from None
        raise ValueError(_first_malformed(path) or f"{path}: unreadable: {exc}") from None
    if table.num_rows == 0 and not bad_rows:
        raise ValueError(f"{path}: no examples (an empty file)")
    table, left_out = _well_formed(table, path, skip_malformed)
    return Clicks(*_values(table), len(bad_rows) + left_out)


_NAMES = [f"c{i}" for i in range(NUM_FIELDS)]


def _well_formed(table, path, skip_malformed: bool):
    """``(rows of table whose label is 0/1 and integer features integers or empty, how many were left out)``;
    without ``skip_malformed`` a bad row raises ``ValueError`` naming ``path`` and its line."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.is_in(table.column("c0"), pa.array(["0", "1"]))
    for name in _NAMES[1:1 + NUM_DENSE]:
        column = table.column(name)
        ok = pc.and_(ok, pc.or_(pc.equal(column, ""), pc.match_substring_regex(column, _INTEGER)))
    ok = ok.to_numpy(zero_copy_only=False)
    if ok.all():
        return table, 0
    if not skip_malformed:
        raise ValueError(_first_malformed(Path(path)) or f"{path}: a malformed line")
    return table.filter(pa.array(ok)), int((~ok).sum())


def _values(table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(label, dense, ids)`` of well-formed rows (string columns ``c0`` .. ``c39``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dense = np.empty((table.num_rows, NUM_DENSE), np.float32)
    for j, name in enumerate(_NAMES[1:1 + NUM_DENSE]):
        column = pc.if_else(pc.equal(table.column(name), ""), "0", table.column(name))
        x = pc.cast(column, pa.int64()).to_numpy().astype(np.float64)
        dense[:, j] = np.log1p(np.maximum(x, 0))  # 0, negative and missing -> 0
    ids = np.empty((table.num_rows, NUM_CATEGORICAL), np.int64)
    for j, name in enumerate(_NAMES[1 + NUM_DENSE:]):
        ids[:, j] = categorical_ids(table.column(name), j)
    label = (pc.cast(table.column("c0"), pa.int8()).to_numpy() if table.num_rows else np.empty(0)).astype(np.float32)
    return label, dense, ids


def dataset(path: str | os.PathLike, *, skip_malformed: bool = False):
    """The examples of the file(s) at ``path`` as a ``ray.data.Dataset`` with columns ``label`` (float32),
    ``dense`` (float32, 13) and ``ids`` (int64, 26), for ``shardps.fit(build, ds, label="label")``.

    Lazy, as Ray datasets are: Ray Data tasks read the files in
    parallel, each file streamed in blocks, and parse each block as
    :func:`read` parses a file; nothing is read here and no file is ever
    held whole in one process. The path is checked now (``FileNotFoundError``
    / ``ValueError`` as :func:`files`); a malformed line fails the dataset's
    execution with a ``ValueError`` naming its file and line, or with
    ``skip_malformed`` is left out (the count logged by the task).
    Needs Ray running (``ray.init()``), as every Ray dataset does; on a
    cluster the read tasks run on any node, so the files must be on storage
    every node sees at the same path.
    """
    import pyarrow as pa
    import ray.data
    from pyarrow import csv

    from shardps.training.feed import quiet_ray_data

    whole_lines = {"read_options": csv.ReadOptions(column_names=["line"], use_threads=False),
                   "parse_options": csv.ParseOptions(delimiter="\x01", quote_char=False),  # never in a log line
                   "convert_options": csv.ConvertOptions(column_types={"line": pa.string()}, strings_can_be_null=False)}
    # half a CPU per task: reading and parsing run side by side even when shards hold a fraction of a CPU
    # (a reader holding a whole CPU could otherwise wait forever on a parser that cannot be scheduled)
    lines = ray.data.read_csv([str(f) for f in files(path)], include_paths=True, num_cpus=0.5, **whole_lines)
    examples = lines.map_batches(_parse_block, batch_size=None, batch_format="pyarrow", num_cpus=0.5,
                                 fn_kwargs={"skip_malformed": skip_malformed})
    examples.context.execution_options.preserve_order = True  # file order: "the last N rows" means something
    quiet_ray_data(examples)
    return examples


def materialized(examples):
    """``examples`` (from :func:`dataset`) computed into Ray's object store. Blocks while Ray Data reads.

    Raises ``ValueError`` naming the file and line of a malformed line (the
    parser's own error, not the Ray Data task failure wrapping it).
    """
    try:
        return examples.materialize()
    except Exception as exc:  # noqa: BLE001 - a task failure: Ray Data keeps only the text of the parser's error
        found = _PARSER_ERROR.search(str(exc))
        if found is None:
            raise
        raise ValueError(found.group(1)) from None


def _parse_block(block, skip_malformed: bool) -> dict:
    """One block of whole lines (columns ``line`` and ``path``) -> ``{"label", "dense", "ids"}``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if block.num_rows == 0:
        return {"label": np.empty(0, np.float32), "dense": np.empty((0, NUM_DENSE), np.float32),
                "ids": np.empty((0, NUM_CATEGORICAL), np.int64)}
    path = block.column("path")[0].as_py()
    fields = pc.split_pattern(block.column("line"), "\t")
    counted = pc.equal(pc.list_value_length(fields), NUM_FIELDS).to_numpy(zero_copy_only=False)
    if not counted.all() and not skip_malformed:
        raise ValueError(_first_malformed(Path(path)) or f"{path}: a line without {NUM_FIELDS} fields")
    flat = pc.list_flatten(fields.filter(pa.array(counted)))
    rows = np.arange(int(counted.sum())) * NUM_FIELDS
    table = pa.table({name: flat.take(pa.array(rows + j)) for j, name in enumerate(_NAMES)})
    table, left_out = _well_formed(table, path, skip_malformed)
    if left_out or not counted.all():
        log.warning("left out %d malformed lines of %s", left_out + int((~counted).sum()), path)
    label, dense, ids = _values(table)
    return {"label": label, "dense": dense, "ids": ids}


def _first_malformed(path: Path) -> str | None:
    """``"<file>:<line>: <why>"`` for the first malformed line of ``path`` (a slow scan: errors only);
    None when every line is well-formed or the file cannot be read."""
    try:
        return _scan(path, re.compile(_INTEGER.encode()))
    except (OSError, EOFError):  # a broken .gz: the caller reports the reader's own error
        return None


def _scan(path: Path, integer) -> str | None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            fields = line.split(b"\t")
            if len(fields) != NUM_FIELDS:
                return f"{path}:{number}: expected {NUM_FIELDS} tab-separated fields, found {len(fields)}"
            if fields[0] not in (b"0", b"1"):
                return f"{path}:{number}: the label must be 0 or 1. Found {fields[0][:20]!r}"
            for j, value in enumerate(fields[1:1 + NUM_DENSE], 1):
                if value and not integer.match(value):
                    return f"{path}:{number}: integer feature {j} is not an integer: {value[:20]!r}"
    return None
