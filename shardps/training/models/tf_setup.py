"""Importing TensorFlow quietly, and keeping it to one thread per process."""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def tensorflow_start_up_silenced():
    """While TensorFlow loads, hide its C++ start-up lines (oneDNN, CUDA stubs, absl's pre-init warning).

    They are printed before TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL``, so
    this points file descriptor 2 at /dev/null meanwhile; only when that
    variable is >= 1 (the CLI sets 3 unless ``-v``). Import errors still
    raise, after stderr is back.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
