"""What a training run reports: evaluation points and a summary."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation: ``step`` is steps per worker (the mean over workers in async modes).

    In async modes the workers train on while an evaluation reads the
    weights (chunk by chunk), so it sees those of step ``step`` or later: in a
    run shorter than one evaluation, a point before the last can already show
    the final weights.

    ``train``: the loss and each compiled metric, means of the per-batch
    values since the previous evaluation; ``metrics``: the loss and metrics
    on the validation data (empty without validation data).
    """

    step: float
    wall_s: float
    samples_per_s: float
    train: dict
    metrics: dict = field(default_factory=dict)

    @property
    def loss(self) -> float:
        return self.train.get("loss", float("nan"))

    @property
    def accuracy(self) -> float:
        """Validation accuracy, if the model reports a metric named ``accuracy``."""
        return self.metrics.get("accuracy", float("nan"))


@dataclass
class History:
    """Evaluations over a run plus its totals. ``staleness`` is min/mean/max over applied pushes."""

    mode: str
    num_shards: int
    num_workers: int
    dataset: str
    points: list[EvalPoint] = field(default_factory=list)
    steps: int = 0
    wall_s: float = 0.0
    samples_per_s: float = 0.0
    staleness: dict = field(default_factory=dict)
    max_lead: int = 0
    start_step: int = 0  # > 0 when resumed from a checkpoint
    recoveries: list = field(default_factory=list)  # restarted shards: {"shard", "from": replica|checkpoint, "step"}
    weights: dict = field(default_factory=dict, repr=False)  # final parameters, name -> ndarray
    logdir: str | None = None  # this run's TensorBoard folder, with TrainConfig.logdir
    reference: dict = field(default_factory=dict)  # the dataset's best achievable metrics (ctr: the teacher's)
    table_rows: dict = field(default_factory=dict)  # embedding table -> rows at the end
    ms_per_step: dict = field(default_factory=dict)  # where a worker step's time went: phase -> mean ms

    @property
    def history(self) -> dict[str, list[float]]:
        """As Keras's ``History.history``: ``"loss"``, each metric, and ``"val_..."`` ones, one value per evaluation."""
        out: dict[str, list[float]] = {}
        for point in self.points:
            for name, value in point.train.items():
                out.setdefault(name, []).append(value)
            for name, value in point.metrics.items():
                out.setdefault(f"val_{name}", []).append(value)
        return out

    @property
    def final_accuracy(self) -> float:
        return self.points[-1].accuracy if self.points else float("nan")

    def summary(self) -> dict:
        """The machine-readable summary printed by ``shardps train --json``."""
        return {
            "final_accuracy": self.final_accuracy, "steps": self.steps, "wall_s": round(self.wall_s, 3),
            "samples_per_s": round(self.samples_per_s, 1), "mode": self.mode, "num_shards": self.num_shards,
            "num_workers": self.num_workers, "dataset": self.dataset, "staleness": self.staleness,
            "max_lead": self.max_lead, "start_step": self.start_step, "recoveries": self.recoveries,
            "logdir": self.logdir, "ms_per_step": self.ms_per_step,
            "final": {k: v[-1] for k, v in self.history.items()},
            **self._table_summary(),
        }

    def _table_summary(self) -> dict:
        """ctr runs: test logloss and AUC beside the teacher's, and the tables' rows."""
        if not self.table_rows:
            return {}
        last = self.points[-1].metrics if self.points else {}
        return {"test_logloss": last.get("logloss", last.get("loss")), "test_auc": last.get("auc"), **self.reference,
                "table_rows": sum(self.table_rows.values())}


def staleness_summary(shard_stats: list[dict]) -> dict:
    """min/mean/max staleness over every push the shards recorded (empty if none)."""
    counts: dict[int, int] = {}
    for stats in shard_stats:
        for staleness, n in stats["staleness"].items():
            counts[staleness] = counts.get(staleness, 0) + n
    total = sum(counts.values())
    if not total:
        return {}
    return {"min": min(counts), "mean": sum(s * n for s, n in counts.items()) / total, "max": max(counts),
            "pushes": total}
