"""A user's compiled Keras model, computing on weights from the shards.

:class:`Replica` builds the model with the user's function (in every worker
process, and on the driver for the checks and evaluations) and turns it into
what the trainers need: named dense weights (its trainable variables, in
order), its tables (every :class:`shardps.keras.Embedding` layer's), the rows
a batch needs, gradients as ``(dense grads, {table: (ids, grads)})``, and
evaluation with the model's own compiled loss and metrics.

Loss and metrics come from the user's ``compile``; its optimizer is not used:
updates are applied on the shards by shardps's optimizers.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from typing import Callable, Iterable

import numpy as np

from shardps.keras import Embedding, RowLookup, keras, tf
from shardps.store.ids import unique
from shardps.training.models.tf_setup import limit_tf_threads

log = logging.getLogger(__name__)

_LOCAL_STATE = ("seed_generator_state",)  # non-trainable variables each replica keeps for itself (Dropout's RNG)


class Replica:
    """The model of ``build`` (a function returning a compiled ``keras.Model``), on shard weights.

    ``names``: the dense keys' names as the driver's replica gave them (a
    worker passes them so that every process uses the same names: Keras's
    automatic layer names depend on what the process built before).

    Raises:
        TypeError: ``build`` does not return a compiled Keras model.
        ValueError: tables used with different settings, a layer whose ids do
            not come from the model's inputs, non-trainable state shared
            weights would need (BatchNormalization's statistics), or ``names``
            that do not match the model's variables.
    """

    def __init__(self, build: Callable[[], object], *, names: list[str] | None = None, seed: int = 0):
        limit_tf_threads()
        keras.utils.set_random_seed(seed)
        with _fresh_names():
            model = build()
        if not isinstance(model, keras.Model):
            raise TypeError(f"the model function {_name(build)} must return a keras.Model. Received: {type(model)}")
        if not model.compiled:
            raise TypeError(f"the model function {_name(build)} must compile its model (loss, metrics): "
                            f"call model.compile(loss=...) before returning it")
        _check_state(model)
        self.model = model
        self._layers = [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, Embedding)]
        self.tables = table_specs(self._layers)
        self._lookups = {name: RowLookup(name, spec.dim) for name, spec in self.tables.items()}
        for layer in self._layers:
            layer.lookup = self._lookups[layer.table]
        self._vars = list(model.trainable_variables)
        self.names = _dense_names(self._vars, names, prefix=f"{model.name}/")
        self.input_names = [t.name for t in model.inputs]
        self._sources = _id_sources(model, self._layers)
        self._ids_model = None
        computed = [t for t in self._sources if not isinstance(t, str)]
        if computed:
            self._ids_model = keras.Model(model.inputs, computed)
        self._bound: dict[str, np.ndarray] = {}
        self._grad_fn = None  # traced on the second step: the first runs eagerly and builds loss and metrics
        self._traced: dict = {}  # the step's ConcreteFunctions by the dtypes and ranks of its arguments

    def _inputs(self, x):
        """``x`` (one array, or a dict of arrays by input name) as the model takes it: a dict, a list in the
        order of its inputs, or one array, as the model was built."""
        if not isinstance(x, dict):
            return x
        if isinstance(self.model.input, dict):
            return {name: x[name] for name in self.input_names}
        if isinstance(self.model.input, (list, tuple)):
            return [x[name] for name in self.input_names]
        return x[self.input_names[0]]

    def check_columns(self, columns: list[str] | None, role: str = "training") -> None:
        """Raise ``ValueError`` unless ``columns`` (None: one unnamed array) are the model's inputs, by name."""
        if columns is None:
            if len(self.input_names) != 1:
                raise ValueError(f"the model has inputs {self.input_names}: give the {role} data as a dict of "
                                 f"arrays keyed by those names")
            return
        missing = sorted(set(self.input_names) - set(columns))
        extra = sorted(set(columns) - set(self.input_names))
        if missing or extra:
            raise ValueError(f"the {role} data's columns do not match the model's inputs {self.input_names}: "
                             + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                                           f"extra {extra}" if extra else "") if part))

    def check_saved(self, saved, where) -> None:
        """Raise ``ValueError`` naming the differences unless checkpoint ``saved`` (what
        ``checkpoint.read`` returns) holds exactly this model's dense keys (same shapes) and tables (same width)."""
        model = {name: tuple(v.shape) for name, v in zip(self.names, self._vars)}
        stored = {name: tuple(value.shape) for name, value in saved.params.items()}
        model.update({f"table {name}": (spec.dim,) for name, spec in self.tables.items()})
        stored.update({f"table {t['name']}": (t["dim"],) for t in saved.manifest["tables"]})
        if model != stored:
            missing, extra = sorted(set(model) - set(stored)), sorted(set(stored) - set(model))
            shapes = [f"{k}: {stored[k]} saved, {model[k]} in the model" for k in model.keys() & stored.keys()
                      if model[k] != stored[k]]
            raise ValueError(f"the checkpoint in {where} does not hold this model's weights: "
                             + "; ".join(part for part in (_few("missing", missing), _few("not in the model", extra),
                                                           *shapes[:4]) if part))

    def get_weights(self) -> dict[str, np.ndarray]:
        """The dense weights held now (the model's initial ones until :meth:`set_weights`)."""
        return {name: v.numpy() for name, v in zip(self.names, self._vars)}

    def rows_needed(self, x) -> dict[str, np.ndarray]:
        """``{table: unique ids, ascending}``: the rows inputs ``x`` look up (pull them before :meth:`set_weights`)."""
        if not self._layers:
            return {}
        computed = iter(self._computed_ids(x))
        per_table: dict[str, list] = {}
        for layer, source in zip(self._layers, self._sources):
            if isinstance(source, str):  # an input: layers reading it alike need the same ids
                ids, reading = (x[source] if isinstance(x, dict) else x), (source, layer.combiner, layer.pad_id)
            else:
                ids, reading = next(computed), id(layer)
            per_table.setdefault(layer.table, []).append((reading, layer.ids_needed(ids)))
        sorted_once: dict = {}  # tables whose layers read the same inputs alike (widedeep's two): one sort
        out = {}
        for name, parts in per_table.items():
            readings = tuple(reading for reading, _ in parts)
            if readings not in sorted_once:
                sorted_once[readings] = unique(np.concatenate([ids for _, ids in parts]).astype(np.int64, copy=False))
            out[name] = sorted_once[readings]
        return out

    def _computed_ids(self, x) -> list:
        if self._ids_model is None:
            return []
        out = self._ids_model(self._inputs(x), training=False)
        return [np.asarray(t) for t in (out if isinstance(out, (list, tuple)) else [out])]

    def set_weights(self, weights: dict, rows_ids: dict[str, np.ndarray] | None = None) -> None:
        """Compute with ``weights`` from now on: dense keys by name, and under each table's name the rows
        of ``rows_ids[table]`` (what :meth:`rows_needed` returned for the batch, in its order)."""
        for name, variable in zip(self.names, self._vars):
            variable.assign(weights[name])
        for table, ids in (rows_ids or {}).items():
            self._lookups[table].bind(ids, weights[table])
        self._bound = dict(rows_ids or {})

    def zero_rows(self, x) -> tuple[dict, dict]:
        """``(weights, rows_ids)`` for a step on ``x`` that talks to no shard (warm-up, checks): the dense
        weights held now and zero rows for the ids of ``x``."""
        needed = self.rows_needed(x)
        zeros = {table: np.zeros((len(ids), self.tables[table].dim), np.float32) for table, ids in needed.items()}
        return {**self.get_weights(), **zeros}, needed

    def compute_gradients(self, x, y, weights: dict | None = None,
                          rows_ids: dict[str, np.ndarray] | None = None) -> tuple[dict, dict, dict]:
        """Gradients of the compiled loss on ``(x, y)`` at ``weights`` (as :meth:`set_weights` takes them,
        with every table's rows), or at the weights set last.

        Given weights are assigned inside the traced step, not one eager
        assignment per variable (which cost more than the step's compute).
        Returns ``(dense grads by name, {table: (ids, grads)}, logs)``; ``logs``
        holds ``"loss"`` and each compiled metric on this batch.
        Raises ``ValueError`` if the loss is not a scalar.
        """
        inputs, values = self._inputs(x), None
        if weights is not None:
            rows_ids = rows_ids or {}
            bound = [self._lookups[t].padded(rows_ids[t], weights[t]) for t in self.tables]
            values = ([weights[name] for name in self.names], [i for i, _ in bound], [r for _, r in bound])
            for lookup in self._lookups.values():
                lookup.bound = True
            self._bound = dict(rows_ids)
        if self._grad_fn is None:
            grads, loss, logs = self._gradients(inputs, y, values)
            self._grad_fn = tf.function(self._gradients, reduce_retracing=True)
        else:
            grads, loss, logs = self._traced_step(inputs, np.asarray(y), values)
        grads = [g.numpy() for g in grads]
        dense = dict(zip(self.names, grads))
        rows = {}
        for table, g in zip(self.tables, grads[len(self.names):]):
            ids = self._bound[table]
            rows[table] = (ids, g[:len(ids)])  # an empty batch bound one padding row
        return dense, rows, {"loss": float(loss), **{k: float(v) for k, v in logs.items() if k != "loss"}}

    def _traced_step(self, inputs, y, values):
        """:meth:`_gradients`, traced: a ConcreteFunction for these arguments' dtypes and ranks, the batch
        and row counts left open, called directly (a ``tf.function`` first matches each argument against its
        traces: 0.2-0.4 ms a step for the built-in widedeep's 13). Arguments of a dtype TensorFlow has no
        spec for go through the ``tf.function``."""
        leaves = tf.nest.flatten((inputs, y, values or ()))
        key = (values is None, tuple((getattr(leaf, "dtype", type(leaf)), np.ndim(leaf)) for leaf in leaves))
        step = self._traced.get(key)
        if step is None:
            try:
                step = self._grad_fn.get_concrete_function(*_open_specs(inputs, y, values))
            except TypeError:
                step = self._grad_fn
            self._traced[key] = step
        return step(inputs, y, values)

    def _gradients(self, x, y, values=None):
        model = self.model
        lookups = [self._lookups[table].rows for table in self.tables]
        if values is not None:
            dense, ids, rows = values
            for variable, value in zip(self._vars + [self._lookups[t].ids for t in self.tables] + lookups,
                                       list(dense) + list(ids) + list(rows)):
                variable.assign(value)
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        if loss.shape.rank != 0:
            raise ValueError(f"the model's loss must be a scalar. Received shape {loss.shape}")
        grads = tape.gradient(loss, self._vars + lookups)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for v, g in zip(self._vars + lookups, grads)]
        for metric in model.metrics:
            metric.reset_state()
        return grads, loss, model.compute_metrics(x, y, y_pred, None)

    def evaluate(self, chunks: Iterable[tuple], pull: Callable[[dict], dict], *, batch_size: int = 1024) -> dict:
        """The compiled loss and metrics over every ``(x, y)`` of ``chunks`` (the validation data).

        ``pull(rows_needed)`` fetches the dense weights and the rows of a
        chunk, once; the model then runs on ``batch_size`` examples at a time.
        The loss is the mean over examples; metrics accumulate over all chunks.
        """
        self.model.reset_metrics()
        total, count = 0.0, 0
        for x, y in chunks:
            needed = self.rows_needed(x)
            self.set_weights(pull(needed), needed)
            for start in range(0, len(y), batch_size):
                part = slice(start, start + batch_size)
                xb = {k: v[part] for k, v in x.items()} if isinstance(x, dict) else x[part]
                loss = self._test_step(self._inputs(xb), tf.convert_to_tensor(y[part]))
                total, count = total + float(loss) * len(y[part]), count + len(y[part])
        logs = {k: float(v) for k, v in self.model.get_metrics_result().items() if k != "loss"}
        return {"loss": total / max(1, count), **logs}

    @property
    def _test_step(self):
        if getattr(self, "_test_fn", None) is None:
            self._test_fn = tf.function(self._evaluate_batch, reduce_retracing=True)
        return self._test_fn

    def _evaluate_batch(self, x, y):
        y_pred = self.model(x, training=False)
        loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        self.model.compute_metrics(x, y, y_pred, None)
        return loss


def _open_specs(inputs, y, values) -> tuple:
    """TensorSpecs of a step's arguments with their first axis open (batch size, rows bound), dense weights exact.
    Raises ``TypeError`` for a dtype TensorFlow has no spec for."""
    def spec(value, open_=True):
        shape = np.shape(value)
        return tf.TensorSpec((None,) + shape[1:] if open_ and shape else shape, tf.as_dtype(np.asarray(value).dtype))

    opened = tf.nest.map_structure(spec, (inputs, y))
    if values is None:
        return (*opened, None)
    dense, ids, rows = values
    return (*opened, ([spec(w, False) for w in dense], [spec(i) for i in ids], [spec(r) for r in rows]))


@contextlib.contextmanager
def _fresh_names():
    """Build with Keras's automatic names (``dense``, ``auc``, ...) counted from zero, as in a fresh process,
    so that the driver's model names its variables and metrics as the workers' do; the process's own
    counters are put back afterwards."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # another Keras layout: names may then differ; dense keys still match by position
        yield
        return
    saved = global_state.get_global_attribute("object_name_uids")
    global_state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        global_state.set_global_attribute("object_name_uids", saved)


def table_specs(layers: list[Embedding]) -> dict:
    """``{table: TableSpec}`` of the layers; raises ``ValueError`` if two layers define one table differently."""
    specs: dict = {}
    for layer in layers:
        known = specs.setdefault(layer.table, layer.spec)
        if known != layer.spec:
            raise ValueError(f"table {layer.table!r} is used by two shardps.keras.Embedding layers with different "
                             f"settings: {known} and {layer.spec}")
    return specs


def _check_state(model) -> None:
    shared = [v.path for v in model.non_trainable_variables if v.name not in _LOCAL_STATE]
    if shared:
        raise ValueError(f"the model has non-trainable variables the workers would have to share, which shardps "
                         f"does not support: {shared[:4]} (BatchNormalization's statistics: use LayerNormalization)")


def _dense_names(variables: list, names: list[str] | None, prefix: str) -> list[str]:
    """The dense keys' names: the variables' paths (``layer/variable``, less the model's own ``prefix``
    that a Sequential model adds), made unique; or ``names`` checked against them."""
    if names is not None:
        if len(names) != len(variables):
            raise ValueError(f"the model function built {len(variables)} trainable variables here and "
                             f"{len(names)} on the driver: it must build the same model in every process")
        return list(names)
    seen: dict[str, int] = {}
    out = []
    for v in variables:
        path = v.path.removeprefix(prefix)
        n = seen[path] = seen.get(path, 0) + 1
        out.append(path if n == 1 else f"{path}#{n}")
    return out


def _id_sources(model, layers: list[Embedding]) -> list:
    """Per layer: the name of the model input it reads, or the (Keras) tensor it reads if computed."""
    inputs = {id(t): t.name for t in model.inputs}
    graph = getattr(model, "_functional", None) or model  # a Sequential model's graph is a functional one inside
    in_graph = {id(node) for nodes in getattr(graph, "_nodes_by_depth", {}).values() for node in nodes}
    sources = []
    for layer in layers:
        nodes = [node for node in layer._inbound_nodes if id(node) in in_graph]
        if len(nodes) != 1:
            raise ValueError(f"shardps.keras.Embedding {layer.name!r} is called {len(nodes)} times in the model's "
                             f"graph: build a functional (or Sequential) model that calls each layer once "
                             f"(layers may share a table); subclassed and nested models are not supported")
        tensor = nodes[0].input_tensors[0]
        sources.append(inputs.get(id(tensor), tensor))
    return sources




def _few(what: str, names: list[str]) -> str:
    """``what`` and up to 6 of ``names`` ("" for none)."""
    if not names:
        return ""
    return f"{what} {len(names)}: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"


def _name(fn) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def checked_replica(build: Callable, data, config) -> Replica:
    """The driver's replica of ``build``, checked against ``data`` (a ``feed.RunData``) before anything starts.

    Runs one step of the user's code on the first training rows (at zero
    rows), so a model, loss or data error surfaces here, once.

    Raises:
        TypeError: ``build`` is not picklable, or not a model function (see :class:`Replica`).
        ValueError: the data's columns do not match the model's inputs (named), or what the step raised.
    """
    import ray.cloudpickle

    if not callable(build):
        raise TypeError(f"the model function must be callable. Received: {build!r}")
    try:
        ray.cloudpickle.dumps(build)
    except Exception as exc:  # noqa: BLE001 - whatever pickling raises, the message says which object
        raise TypeError(f"the model function {_name(build)} must be picklable (it is sent to every worker): "
                        f"{type(exc).__name__}: {exc}") from None
    replica = Replica(build, seed=config.seed)
    for role, examples in (("training", data.train), ("validation", data.validation)):
        if examples is not None:
            replica.check_columns(examples.columns(), role)
    x, y = data.train.head(min(config.batch_size, len(data.train)))
    replica.compute_gradients(x, y, *replica.zero_rows(x))
    return replica
