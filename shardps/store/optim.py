"""Server-side update rules, applied in place to flat numpy buffers.

Each optimizer is a small frozen dataclass (picklable, so it travels to the
shard actors and into checkpoint manifests) with two methods:

- ``slots()``: names of the per-element state arrays it keeps (zero-initialised);
- ``apply(param, grad, state, step)``: update ``param`` in place from ``grad``;
  ``state`` maps slot name -> array of ``param``'s shape; ``step`` is how many
  updates these elements received before this one (Adam's bias correction):
  an int, or for embedding rows an array of shape ``(rows, 1)``, one per row
  (lazy Adam: only rows that are updated advance).

All arrays are 1-D slices of a shard's buffer, so one call updates every key
on the shard in a single vectorised expression. The update a client sends is a
*gradient*: ``SGD(lr)`` does ``param -= lr * grad``. The original Ray example's
"push adds the value" server is ``SGD(lr=-1.0)``.

Adam, Adagrad and FTRL compute their intermediate terms in scratch arrays
that each thread keeps between calls: a fresh temporary of a MiB or more is new
memory from the OS every time (glibc returns it on free), and its page faults
made Adam over 100 MB take 165-190 ms instead of ~40 (2-core machine).
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass

import numpy as np

_scratch = threading.local()


def scratch_like(like: np.ndarray, count: int, dtype=None, *, user: str = "optimizer") -> tuple[np.ndarray, ...]:
    """``count`` arrays shaped like ``like`` (of ``dtype``, default its own; contents undefined), kept by the
    calling thread for reuse until its next call with the same ``user`` and dtype.

    Each ``user`` has its own arrays, so one may hand its result to another
    (``update`` passes an averaged gradient to the optimizers).
    """
    dtype = np.dtype(dtype or like.dtype)
    pools = getattr(_scratch, "pools", None)
    if pools is None:
        pools = _scratch.pools = {}
    pool = pools.get((user, dtype), ())
    if len(pool) < count or pool[0].size < like.size:
        size = max(like.size, pool[0].size if pool else 0)
        pool = pools[(user, dtype)] = tuple(np.empty(size, dtype) for _ in range(max(count, len(pool))))
    return tuple(buf[:like.size].reshape(like.shape) for buf in pool[:count])


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Argument `{name}` must be a positive finite number. Received: {value!r}")


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ValueError(f"Argument `{name}` must be in [0, 1). Received: {value!r}")


@dataclass(frozen=True)
class SGD:
    """Plain SGD: ``p -= lr * g``. A negative ``lr`` is allowed (``-1`` adds the push)."""

    lr: float = 0.01

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr != 0):
            raise ValueError(f"Argument `lr` must be a finite non-zero number. Received: {self.lr!r}")

    def slots(self) -> tuple[str, ...]:
        return ()

    def apply(self, param, grad, state, step) -> None:
        if self.lr == -1.0:
            param += grad  # "push adds": bit-identical to the general rule, with no temporary
        else:
            param -= self.lr * grad


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball momentum (TF convention): ``v = mu * v + g; p -= lr * v``."""

    lr: float = 0.01
    momentum: float = 0.9

    def __post_init__(self):
        _check_positive("lr", self.lr)
        _check_fraction("momentum", self.momentum)

    def slots(self) -> tuple[str, ...]:
        return ("velocity",)

    def apply(self, param, grad, state, step) -> None:
        v = state["velocity"]
        v *= self.momentum
        v += grad
        param -= self.lr * v


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba) with bias correction; the step counts per key."""

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7  # Keras' default

    def __post_init__(self):
        _check_positive("lr", self.lr)
        _check_fraction("beta1", self.beta1)
        _check_fraction("beta2", self.beta2)
        _check_positive("eps", self.eps)

    def slots(self) -> tuple[str, ...]:
        return ("m", "v")

    def apply(self, param, grad, state, step) -> None:
        m, v = state["m"], state["v"]
        a, b = scratch_like(grad, 2)
        m *= self.beta1
        m += np.multiply(grad, 1 - self.beta1, out=a)
        v *= self.beta2
        v += np.multiply(np.square(grad, out=a), 1 - self.beta2, out=a)
        t = step + 1
        # in the parameters' dtype: a float64 factor would make numpy compute the update in float64 (3x slower)
        lr_t = (self.lr * np.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)).astype(param.dtype)
        np.multiply(m, lr_t, out=a)
        np.add(np.sqrt(v, out=b), self.eps, out=b)
        param -= np.divide(a, b, out=a)  # lr_t * m / (sqrt(v) + eps)


@dataclass(frozen=True)
class Adagrad:
    """Adagrad: ``acc += g**2; p -= lr * g / (sqrt(acc) + eps)``."""

    lr: float = 0.01
    eps: float = 1e-7

    def __post_init__(self):
        _check_positive("lr", self.lr)
        _check_positive("eps", self.eps)

    def slots(self) -> tuple[str, ...]:
        return ("accumulator",)

    def apply(self, param, grad, state, step) -> None:
        acc = state["accumulator"]
        a, b = scratch_like(grad, 2)
        acc += np.square(grad, out=a)
        np.multiply(grad, self.lr, out=a)
        np.add(np.sqrt(acc, out=b), self.eps, out=b)
        param -= np.divide(a, b, out=a)  # lr * grad / (sqrt(acc) + eps)


@dataclass(frozen=True)
class FTRL:
    """FTRL-Proximal (McMahan et al. 2013), the CTR classic; TensorFlow's ``Ftrl`` with ``lr_power=-0.5``.

    Per element: ``n' = n + g**2; z += g - (sqrt(n') - sqrt(n)) / lr * p; n = n'``, then
    ``p = 0`` where ``|z| <= l1``, else ``p = -(z - sign(z) * l1) / ((beta + sqrt(n)) / lr + 2 * l2)``.
    """

    lr: float = 0.05
    l1: float = 0.0
    l2: float = 0.0
    beta: float = 0.0
    initial_accumulator: float = 0.1  # TensorFlow's default: n starts here, not at 0

    def __post_init__(self):
        _check_positive("lr", self.lr)
        _check_positive("initial_accumulator", self.initial_accumulator)
        for name in ("l1", "l2", "beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Argument `{name}` must be a finite number >= 0. Received: {value!r}")

    def slots(self) -> tuple[str, ...]:
        return ("z", "sum_sq")  # sum_sq: the squared gradients so far, so n = initial_accumulator + sum_sq

    def apply(self, param, grad, state, step) -> None:
        # the formula's operations in its order, each into a scratch array (bit-identical to the plain expressions)
        z, sum_sq = state["z"], state["sum_sq"]
        a, g2, root = scratch_like(grad, 3)
        (zeroed,) = scratch_like(grad, 1, bool)
        n = np.add(sum_sq, self.initial_accumulator, out=a)
        np.square(grad, out=g2)
        np.sqrt(np.add(n, g2, out=root), out=root)  # sqrt(n'), n' = n + g**2: used twice
        np.subtract(root, np.sqrt(n, out=a), out=a)
        np.divide(a, self.lr, out=a)
        z += np.subtract(grad, np.multiply(a, param, out=a), out=a)  # g - (sqrt(n') - sqrt(n)) / lr * p
        sum_sq += g2
        denom = np.add(np.divide(np.add(root, self.beta, out=root), self.lr, out=root), 2 * self.l2, out=root)
        np.subtract(np.multiply(np.sign(z, out=a), self.l1, out=a), z, out=a)
        np.divide(a, denom, out=a)  # (sign(z) * l1 - z) / denom
        np.less_equal(np.abs(z, out=g2), self.l1, out=zeroed)
        np.copyto(a, 0, where=zeroed)
        param[...] = a


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum, "adam": Adam, "adagrad": Adagrad, "ftrl": FTRL}
NONNEGATIVE_SLOTS = {"v", "accumulator", "sum_sq"}  # sums of squares: a negative one turns updates into NaN


def check_state(slot: str, values: np.ndarray) -> str | None:
    """Why optimizer state ``values`` of ``slot`` cannot be right (not finite, a sum of squares below 0), or None."""
    if not np.isfinite(values).all():
        return "holds NaN or Inf"
    if slot in NONNEGATIVE_SLOTS and values.size and values.min() < 0:
        return "holds negative values (a sum of squares)"
    return None


def optimizer_config(opt) -> dict:
    """A JSON-safe description of an optimizer: ``{"name": ..., **hyperparameters}``. Raises ``ValueError``."""
    name = next((n for n, cls in OPTIMIZERS.items() if type(opt) is cls), None)
    if name is None:
        raise ValueError(f"Argument `optimizer` must be one of shardps.SGD, Momentum, Adam, Adagrad or FTRL "
                         f"(an instance). Received: {opt!r:.80}")
    return {"name": name, **asdict(opt)}


def optimizer_from_config(config: dict):
    """Inverse of :func:`optimizer_config`. Raises ``ValueError`` for an unknown name."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](**config)
