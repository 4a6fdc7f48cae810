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


def limit_tf_threads() -> None:
    """One intra-op and one inter-op thread: many processes share 2 cores. Call before any TF op."""
    with tensorflow_start_up_silenced():
        import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised in this process: keep its setting
        pass
