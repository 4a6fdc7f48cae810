"""A plain single-dict parameter server: the oracle every sharded result is checked against."""
import numpy as np


class DictServer:
    """Same optimizers as shardps, written per key with no sharding or packing."""

    def __init__(self, optimizer, params):
        self.opt = optimizer
        self.params = {k: np.array(v, copy=True) for k, v in params.items()}
        self.state = {k: {s: np.zeros_like(v) for s in optimizer.slots()} for k, v in self.params.items()}
        self.steps = dict.fromkeys(self.params, 0)

    def push(self, grads):
        for key, grad in grads.items():
            p = self.params[key]
            g = np.asarray(grad, p.dtype)
            self._apply(key, p, g)
            self.steps[key] += 1

    def _apply(self, key, p, g):
        name = type(self.opt).__name__
        st, t, o = self.state[key], self.steps[key] + 1, self.opt
        if name == "SGD":
            p -= o.lr * g
        elif name == "Momentum":
            st["velocity"][...] = o.momentum * st["velocity"] + g
            p -= o.lr * st["velocity"]
        elif name == "Adam":
            st["m"][...] = o.beta1 * st["m"] + (1 - o.beta1) * g
            st["v"][...] = o.beta2 * st["v"] + (1 - o.beta2) * g * g
            mhat = st["m"] / (1 - o.beta1 ** t)
            vhat = st["v"] / (1 - o.beta2 ** t)
            p -= o.lr * mhat / (np.sqrt(vhat) + o.eps / np.sqrt(1 - o.beta2 ** t))  # Keras' "epsilon hat" form
        elif name == "Adagrad":
            st["accumulator"][...] += g * g
            p -= o.lr * g / (np.sqrt(st["accumulator"]) + o.eps)
        elif name == "FTRL":  # TensorFlow's Ftrl (lr_power -0.5), written with its own accumulator
            accum = st.setdefault("accum", np.full_like(p, o.initial_accumulator))
            new = accum + g * g
            st["linear"] = st.get("linear", np.zeros_like(p)) + g - (np.sqrt(new) - np.sqrt(accum)) / o.lr * p
            accum[...] = new
            quadratic = (o.beta + np.sqrt(new)) / o.lr + 2 * o.l2
            lin = st["linear"]
            p[...] = np.where(np.abs(lin) > o.l1, (np.sign(lin) * o.l1 - lin) / quadratic, 0.0)
        else:
            raise AssertionError(name)

    def pull(self, keys=None):
        return {k: self.params[k].copy() for k in (keys or self.params)}
