"""Reading Criteo-format click logs: rows/s of ``shardps.training.criteo.read`` (pyarrow's CSV reader and
vectorised id mapping) against what a user would write instead: pandas ``read_csv`` and a Python loop
mapping each categorical value by the same documented formula. Both must give identical arrays.

    python -m benchmarks.criteo_read --rows 200000 --rounds 3 --out bench-out/criteo
"""
from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import median, print_table, write_rows


def generate(path: Path, rows: int, *, seed: int = 0) -> None:
    """A Criteo-format file: Zipf-like categoricals as 8 hex digits, ~5 % of every feature missing."""
    from shardps.training import criteo

    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, rows)
    ints = rng.geometric(0.05, (rows, criteo.NUM_DENSE)) - 2  # some -1, as in the real logs
    cats = (rng.zipf(1.2, (rows, criteo.NUM_CATEGORICAL)) * 2654435761) % 2**32
    missing = rng.random((rows, criteo.NUM_DENSE + criteo.NUM_CATEGORICAL)) < 0.05
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for i in range(rows):
            fields = [str(label[i])] + [str(v) for v in ints[i]] + [f"{v:08x}" for v in cats[i]]
            f.write("\t".join("" if m else v for v, m in zip(fields, [False, *missing[i]])) + "\n")


def python_reference(path: Path):
    """pandas read_csv, then each categorical value mapped in a Python loop (the documented formula)."""
    import pandas as pd
    import xxhash

    from shardps.training import criteo

    df = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False, na_filter=False)
    label = df[0].astype(np.float32).to_numpy()
    ints = df.iloc[:, 1:1 + criteo.NUM_DENSE].replace("", "0").astype(np.int64).to_numpy()
    dense = np.log1p(np.maximum(ints, 0)).astype(np.float32)
    ids = np.empty((len(df), criteo.NUM_CATEGORICAL), np.int64)
    for f in range(criteo.NUM_CATEGORICAL):
        column = []
        for v in df[1 + criteo.NUM_DENSE + f]:
            if not v:
                column.append(criteo.MISSING_BASE + f)
            elif len(v) == 8 and all(c in "0123456789abcdefABCDEF" for c in v):
                column.append((f << 32) | int(v, 16))
            else:
                column.append(criteo.HASHED_BIT | (xxhash.xxh64_intdigest(v.encode(), seed=f) & criteo.HASH_MASK))
        ids[:, f] = column
    return label, dense, ids


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gzip", action="store_true", help="also time a gzip-compressed copy")
    p.add_argument("--out", type=Path, default=Path("bench-out/criteo"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:  # the generated logs are not results: never kept
        paths = [Path(folder) / "clicks.txt"] + ([Path(folder) / "clicks.txt.gz"] if args.gzip else [])
        for path in paths:
            generate(path, args.rows)
        rows = _measure(paths, args.rows, args.rounds)
    print_table(rows, ["file", "reader", "rows", "median_s", "rows_per_s", "vs_pandas_loop"])
    write_rows(args.out, "criteo_read", rows)


def _measure(paths: list[Path], num_rows: int, rounds: int) -> list[dict]:
    """Check both readers agree on every file, then time them taking turns, ``rounds`` times."""
    from shardps.training import criteo

    readers = {"shardps criteo.read": lambda path: criteo.read(path)[:3], "pandas + Python loop": python_reference}
    for path in paths:  # both give the same arrays: the reference is an oracle too
        for a, b in zip(readers["shardps criteo.read"](path), python_reference(path)):
            np.testing.assert_array_equal(a, b)
    times: dict[tuple, list[float]] = {}
    for _ in range(rounds):  # the readers take turns, round after round
        for path in paths:
            for name, read in readers.items():
                start = time.perf_counter()
                read(path)
                times.setdefault((path.name, name), []).append(time.perf_counter() - start)
    rows = []
    for (file, name), seconds in times.items():
        reference = median(times[(file, "pandas + Python loop")])
        rows.append({"file": file, "reader": name, "rows": num_rows, "median_s": median(seconds),
                     "rows_per_s": num_rows / median(seconds), "vs_pandas_loop": reference / median(seconds)})
    return rows


if __name__ == "__main__":
    main()
