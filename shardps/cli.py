"""The ``shardps`` command: ``shardps train ...``, ``shardps export ...`` and ``shardps bench ...``.

The only module that reads ``sys.argv`` or prints for humans. Flags are
checked (through :class:`TrainConfig`) before Ray starts; a bad flag exits
with a usage error and status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import subprocess
import signal
import sys
import threading

from shardps.training.config import MODES, TrainConfig, prepare_folders
from shardps.training.data import DATASETS
from shardps.training.models import MODELS
from shardps.store.optim import OPTIMIZERS


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model on the parameter server",
                       description="Data-parallel training of a TensorFlow model against sharded parameter actors.")
    d = TrainConfig()
    p.add_argument("--mode", choices=MODES, default=d.mode, help="sync (BSP), async (ASP) or ssp (bounded staleness)")
    p.add_argument("--num-shards", type=int, default=d.num_shards, help="parameter shard actors")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="training worker actors")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="steps per worker (default 300; widedeep: one epoch)")
    g.add_argument("--epochs", type=float, help="passes over each worker's data instead of --steps")
    p.add_argument("--batch-size", type=int, help="examples per worker step (default 32; widedeep: 256)")
    p.add_argument("--lr", type=float,
                   help="learning rate (default 0.05; widedeep: 0.002); sync multiplies it by --num-workers")
    p.add_argument("--no-scale-lr", dest="scale_lr", action="store_false", help="sync: do not scale lr by workers")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS),
                   help="server-side update rule for dense keys (default sgd; widedeep: adam)")
    p.add_argument("--model", default=d.model, metavar="{" + ",".join(MODELS) + ",module:function}",
                   help="widedeep: a CTR model on embedding tables; module:function: your model function "
                        "(returns a compiled keras.Model taking the dataset's inputs)")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="auto: MNIST if found locally, else digits (widedeep: ctr, synthetic click logs; "
                        "criteo: Criteo-format logs at --data-dir)")
    t = p.add_argument_group("embedding tables (widedeep)")
    t.add_argument("--table-optimizer", choices=("adagrad", "adam", "ftrl", "sgd"), default=d.table_optimizer,
                   help="per-row update rule")
    t.add_argument("--table-lr", type=float, default=d.table_lr, help="its learning rate")
    t.add_argument("--embedding-dim", type=int, default=d.embedding_dim, help="width of the emb table's rows")
    t.add_argument("--min-count", type=int, default=d.min_count, help="pushes an id needs before it gets a row")
    t.add_argument("--max-rows", type=int, help="rows per table at most (each shard keeps its share, max-rows // shards); "
                   "the least recently updated are evicted")
    p.add_argument("--data-dir", help="mnist: folder with IDX files or mnist.npz; criteo: a file, glob or folder")
    c = p.add_argument_group("Criteo-format click logs (--dataset criteo)")
    c.add_argument("--test-data", help="held-out file(s) (default: the last --test-rows rows)")
    c.add_argument("--test-rows", type=int, help="rows held out at the end for testing (default: 10 %%)")
    c.add_argument("--skip-malformed", action="store_true", help="leave malformed lines out (counted) instead of failing")
    p.add_argument("--download", action="store_true", help="allow downloading MNIST if not found locally")
    p.add_argument("--staleness", type=int, help="ssp: max steps a worker may lead the slowest (default 2)")
    p.add_argument("--max-inflight", type=int, default=d.max_inflight, help="async/ssp: unacknowledged pushes per worker")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--shard-resources", type=_json_object, metavar="JSON",
                   help='Ray resources each shard needs, e.g. \'{"ps": 0.01}\': shards on the nodes that have them')
    p.add_argument("--worker-resources", type=_json_object, metavar="JSON", help="the same for each worker")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations on the test set")
    p.add_argument("--checkpoint-dir", help="save checkpoints here (at the end, and every --checkpoint-every steps)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    p.add_argument("--replicas", type=int, choices=(1, 2), default=d.replicas,
                   help="2: mirror every shard on a replica actor; a crashed shard then loses nothing")
    p.add_argument("--max-restarts", type=int, default=d.max_restarts,
                   help="restarts per crashed worker or shard (shards: with --checkpoint-dir or --replicas 2)")
    p.add_argument("--logdir", help="write TensorBoard event files to a new run folder here "
                                     "(watch with: tensorboard --logdir DIR)")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show what shardps, Ray and TensorFlow log")
    p.set_defaults(run=_run_train, parser=p)
    return p


def _json_object(text: str) -> dict:
    """A JSON object from the command line (argparse reports the error with the flag's name)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"ps\": 0.01}}', got {text!r}")
    return value


def _config_from(args, parser) -> TrainConfig:
    """The run's TrainConfig; bad values exit 2 with TrainConfig's message, its field names as this CLI's flags."""
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    try:
        config = TrainConfig(**fields)
        prepare_folders(config)
        return config
    except ValueError as exc:
        flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
        parser.error(re.sub(r"(?:Argument )?`(\w+)`", lambda m: flags.get(m[1], m[0]), str(exc)))


class _Reporter:
    """Progress for humans: a bar on a terminal, a line per evaluation otherwise."""

    def __init__(self, enabled: bool):
        self._bar = None
        self._enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="step", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, event: dict) -> None:
        if not self._enabled:
            return
        acc = "".join(f" {k}={v:.4f}" for k, v in event.items() if k.startswith("val_") and k != "val_loss")
        if self._bar is not None:
            self._bar.total = event["total"]
            self._bar.n = round(event["step"], 1)
            self._bar.set_postfix_str(f"loss={event['loss']:.4f}{acc} {event['samples_per_s']:.0f} samples/s")
        elif acc:
            print(f"step {event['step']:.0f}/{event['total']} loss={event['loss']:.4f}{acc} "
                  f"{event['samples_per_s']:.0f} samples/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _run_train(args, parser) -> int:
    config = _config_from(args, parser)
    from shardps.training.run import train  # imports TensorFlow: only after the flags are good

    if config.dataset == "criteo" and not getattr(args, "verbose", False):
        from shardps.training.feed import quiet_ray_data_logs

        quiet_ray_data_logs(logging.CRITICAL)  # Ray Data reads the logs; a malformed line is reported below

    reporter = _Reporter(enabled=True)
    try:  # Ray's init installs its own SIGTERM handler: put ours back once the run is up
        history = train(config, progress=reporter, on_start=lambda ps, workers: _end_on_sigterm())
    finally:
        reporter.close()
    summary = history.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        st = summary["staleness"]
        stale = f", staleness min/mean/max {st['min']}/{st['mean']:.2f}/{st['max']}" if st else ""
        final = summary["final"]
        quality = ", ".join(f"test {k[4:]} {v:.4f}" for k, v in final.items() if k.startswith("val_") and k != "val_loss")
        if "test_auc" in summary:
            teacher = (f" (teacher {summary['teacher_logloss']:.4f} / {summary['teacher_auc']:.4f})"
                       if "teacher_auc" in summary else "")
            quality = (f"test logloss {summary['test_logloss']:.4f} auc {summary['test_auc']:.4f}{teacher}, "
                       f"{summary['table_rows']} rows")
        print(f"{config.mode}: {summary['steps']} steps on {summary['dataset']} with {config.num_shards} shards, "
              f"{config.num_workers} workers: {quality}, "
              f"{summary['wall_s']:.1f} s, {summary['samples_per_s']:.0f} samples/s{stale}")
    if history.logdir and not args.json:
        print(f"TensorBoard: tensorboard --logdir {config.logdir}  (this run: {history.logdir})", file=sys.stderr)
    for rec in summary["recoveries"]:
        if rec["from"] == "replica":
            print(f"shard {rec['shard']} crashed and restarted from its replica: nothing was lost", file=sys.stderr)
        else:
            print(f"shard {rec['shard']} crashed and restarted from the checkpoint at step {rec['step']}: "
                  f"its updates after that step were lost", file=sys.stderr)
    return 0


def _export_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a checkpoint's model as a plain Keras model, to serve without shardps",
                       description="Writes the model of the latest checkpoint in CHECKPOINT_DIR as a .keras file that "
                       "keras.models.load_model reads without shardps or Ray: dense weights as trained, each embedding "
                       "table as IntegerLookup + Embedding layers holding its rows (ids without a row read zeros).")
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="a --checkpoint-dir of shardps train")
    p.add_argument("--out", required=True, help="the model file to write (name ending in .keras)")
    p.add_argument("--model", metavar="module:function",
                   help="the model function the run trained (default: the one the checkpoint names)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show TensorFlow's logs")
    p.set_defaults(run=_run_export, parser=p)
    return p


def _run_export(args, parser) -> int:
    from shardps.store import checkpoint

    if not args.out.endswith(".keras"):
        parser.error(f"--out must name a .keras file. Received: {args.out!r}")
    if args.model is not None and ":" not in args.model:
        parser.error(f"--model must be module:function (a built-in model is named by its checkpoint). "
                     f"Received: {args.model!r}")
    if checkpoint.latest(args.checkpoint_dir) is None:
        parser.error(f"no checkpoint in {args.checkpoint_dir!r} (no LATEST file or manifest.json there)")
    from shardps.training.models import load_function, saved_description

    if args.model is None:  # raises here, before TensorFlow loads, if the checkpoint names no model function
        saved_description(checkpoint.read_manifest(args.checkpoint_dir), args.checkpoint_dir)
    from shardps.training.export import export  # imports TensorFlow: only after the flags are good

    path = export(args.checkpoint_dir, args.out, None if args.model is None else load_function(args.model))
    print(f"wrote {path}: load it with keras.models.load_model (no shardps needed)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardps", description="A sharded parameter server on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what shardps does")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _export_parser(sub)
    bench = sub.add_parser("bench", help="run a benchmark script from a source checkout (see benchmarks/)",
                           description="Runs `python -m benchmarks.cli WHICH [flags]` from a source checkout; "
                           "`python -m benchmarks.cli --help` lists the benchmarks.")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="which benchmark and its flags")
    bench.set_defaults(run=_run_bench, parser=bench)
    return parser


def _run_bench(args, parser) -> int:
    """The benchmarks are a program of their own (benchmarks/cli.py), run in a child process: the
    library never imports them. Returns its exit status."""
    return subprocess.call([sys.executable, "-m", "benchmarks.cli", *args.args])


def _protect_local_ray(args) -> None:
    """Token authentication with a fresh random token for a local Ray, unless RAY_AUTH_MODE is set.

    A local Ray listens on 127.0.0.1 only (see ``cluster.start_ray``); the
    token also keeps out other users of this machine. Ray reads these
    variables when it is imported: this runs before that.
    """
    local = getattr(args, "address", None) is None and "RAY_ADDRESS" not in os.environ
    if local and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the same clean-up runs."""


def _end_on_sigterm() -> None:
    def handler(signum, frame):
        raise _Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shardps`` console script; returns the exit status.

    0 done, 1 a run-time error (message on stderr), 2 bad flags, 130 Ctrl-C,
    143 SIGTERM; the last two after removing every actor started.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # TensorFlow's own switch for its C++ logging (and its start-up lines, see shardps.training.models); -v keeps them
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if args.verbose else "3")
    if "ray" not in sys.modules:
        _protect_local_ray(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _end_on_sigterm()
    try:
        return args.run(args, args.parser)
    except KeyboardInterrupt as exc:
        print(f"{'terminated' if isinstance(exc, _Terminated) else 'interrupted'}: shards and workers removed",
              file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except (ValueError, FileNotFoundError, ConnectionError) as exc:
        print(f"shardps: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
