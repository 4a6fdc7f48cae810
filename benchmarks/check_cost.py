"""Would fusing the NaN/Inf check into the shard's update save its cost? In one process, no Ray.

A gradient of ``--mb`` MB that was just written (as Ray's copy into the
object store leaves a message: in the shared L3 cache) is applied to
parameters that are out of cache, with push-adds, four ways, taking turns
round after round (medians):

- ``add``: ``p += g``, an unchecked push;
- ``check, add``: :func:`shardps.store.wire.all_finite` over ``g``, then ``p += g``
  (what a checked push does today, on the client);
- ``fused, second buffer``: ``q = p + g`` chunk by chunk, each chunk of
  ``q`` checked while in cache, then ``p`` and ``q`` swap: all-or-nothing,
  at twice the memory;
- ``fused, in place``: check a chunk of ``g``, add it, next chunk. Not
  all-or-nothing (a bad last chunk finds the others applied): a lower
  bound for any fused form.

    python -m benchmarks.check_cost --mb 13 --rounds 40
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits  # comes with scikit-learn

from benchmarks.common import median, print_table
from shardps.store.update import CHUNK
from shardps.store.wire import all_finite


def variants(size: int) -> dict:
    """name -> ``fn(state)`` applying ``state["g"]`` to ``state["p"]``; raises ``ValueError`` on NaN/Inf."""
    def add(s):
        s["p"] += s["g"]

    def check_add(s):
        if not all_finite(s["g"]):
            raise ValueError("NaN/Inf")
        s["p"] += s["g"]

    def fused_second_buffer(s):
        p, q, g = s["p"], s["q"], s["g"]
        for a in range(0, size, CHUNK):
            out = np.add(p[a:a + CHUNK], g[a:a + CHUNK], out=q[a:a + CHUNK])
            if not all_finite(out):
                raise ValueError("NaN/Inf")
        s["p"], s["q"] = q, p

    def fused_in_place(s):
        p, g = s["p"], s["g"]
        for a in range(0, size, CHUNK):
            if not all_finite(g[a:a + CHUNK]):
                raise ValueError("NaN/Inf")
            p[a:a + CHUNK] += g[a:a + CHUNK]

    return {"add": add, "check, add": check_add, "fused, second buffer": fused_second_buffer,
            "fused, in place": fused_in_place}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.check_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=13.0, help="gradient size (the CNN: 13)")
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    size = max(1, int(args.mb * 1e6 / 4))
    rng = np.random.default_rng(0)
    message = rng.standard_normal(size).astype(np.float32)
    flush = np.ones(16 * 2**20, np.float32)  # 64 MB: twice the L3 here
    fns = variants(size)
    states = {name: {"p": np.zeros(size, np.float32), "q": np.zeros(size, np.float32),
                     "g": np.empty(size, np.float32)} for name in fns}
    with threadpool_limits(1, user_api="blas"):  # one BLAS thread, as in each of the shard's update threads
        seconds = _timed(fns, states, message, flush, args.rounds)
    plain = median(seconds["add"])
    rows = [{"variant": name, "ms": round(1e3 * median(s), 3), "vs_add": round(median(s) / plain, 2)}
            for name, s in seconds.items()]
    print_table(rows, ["variant", "ms", "vs_add"])
    return rows


def _timed(fns: dict, states: dict, message: np.ndarray, flush: np.ndarray, rounds: int) -> dict:
    """Seconds of each variant per round (``{name: [seconds]}``); variants take turns within a round."""
    seconds: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            state = states[name]
            flush.sum()                      # parameters (and everything else) out of cache
            np.copyto(state["g"], message)   # the message just written
            t0 = time.perf_counter()
            fn(state)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


if __name__ == "__main__":
    main()
