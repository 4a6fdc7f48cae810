"""The ``ctr`` dataset: synthetic click-through data from a known wide & deep *teacher*, and its metrics.

Each example has ``fields`` categorical ids (field f draws rank r with
probability proportional to r ** -1.15 over ``vocab`` ranks; its id is
``f * vocab + r``, so fields never share ids) and ``dense`` standard-normal
features. The label is drawn from sigmoid(teacher logit), where the teacher
is a wide & deep model with its own random embeddings (dim 8), wide weights
and a 16-unit hidden layer. Only each field's ``signal_ids`` most frequent
ids carry signal in the teacher: the long tail is noise, as rare ids are in
real click logs, and a student cannot learn ids it sees a few times anyway.
Because the teacher is known, the best achievable test logloss and AUC are
computed exactly on the held-out set (:attr:`Dataset.reference`).

Examples are one numpy structured array (fields ``ids`` int64 and ``dense``
float32), so they split and batch like images. Deterministic by ``seed``.
"""
from __future__ import annotations

import numpy as np

ZIPF_EXPONENT = 1.15


def examples_dtype(fields: int, dense: int) -> np.dtype:
    return np.dtype([("ids", np.int64, (fields,)), ("dense", np.float32, (dense,))])


def generate(*, num_train: int = 300_000, num_test: int = 20_000, fields: int = 8, vocab: int = 100_000,
             dense: int = 4, signal_ids: int = 100, seed: int = 0):
    """``(x_train, y_train, x_test, y_test, reference)``; ``reference`` holds the teacher's test
    ``teacher_logloss`` and ``teacher_auc``. Labels are float32 0/1."""
    rng = np.random.default_rng([seed, 0xC7])
    n = num_train + num_test
    cdf = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -ZIPF_EXPONENT)
    ranks = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random((n, fields))), vocab - 1)
    x = np.empty(n, examples_dtype(fields, dense))
    x["ids"] = ranks + np.arange(fields, dtype=np.int64) * vocab
    x["dense"] = rng.standard_normal((n, dense)).astype(np.float32)
    probability = sigmoid(_teacher_logits(ranks, x["dense"], rng, signal_ids))
    y = (rng.random(n) < probability).astype(np.float32)
    test = slice(num_train, n)
    reference = {"teacher_logloss": logloss(y[test], probability[test]), "teacher_auc": auc(y[test], probability[test])}
    return x[:num_train], y[:num_train], x[test], y[test], reference


def _teacher_logits(ranks: np.ndarray, dense: np.ndarray, rng, signal_ids: int) -> np.ndarray:
    """Wide (one weight per id) + deep (embeddings dim 8 and dense features -> 16 relu -> 1), scaled to
    a logit of standard deviation 1.5 around a click rate of about 25 %."""
    fields = ranks.shape[1]
    head = ranks < signal_ids  # tail ids: weight and embedding zero
    wide = rng.normal(0, 1.0, (fields, signal_ids))
    emb = rng.normal(0, 1.0, (fields, signal_ids, 8))
    hidden_w = rng.normal(0, 1 / np.sqrt(fields * 8 + dense.shape[1]), (fields * 8 + dense.shape[1], 16))
    out_w = rng.normal(0, 1 / 4, 16)
    clipped = np.where(head, ranks, 0)
    field = np.arange(fields)
    wide_part = (wide[field, clipped] * head).sum(axis=1)
    deep_in = np.concatenate([(emb[field, clipped] * head[..., None]).reshape(len(ranks), -1), dense], axis=1)
    deep_part = np.maximum(deep_in @ hidden_w, 0) @ out_w
    logit = wide_part / np.sqrt(fields) + deep_part
    return 1.5 * (logit - logit.mean()) / logit.std() - 1.3


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` for 0/1 labels ``y`` (clipped to 1e-7)."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties: half)."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]]))
    ends = np.append(starts[1:], len(score))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # average rank of each tie group
    positives = float(np.sum(y == 1))
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))
