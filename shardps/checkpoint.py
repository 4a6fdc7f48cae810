"""Checkpoints: safe formats only (npz without pickle + a JSON manifest), written atomically.

A checkpoint folder holds one sub-folder per save, ``ckpt-<step>``, and a
``LATEST`` file naming the newest complete one. A save writes the sub-folder
under a temporary name, renames it, then replaces ``LATEST`` with
``os.replace`` (atomic), so a crash at any moment leaves the previous
checkpoint intact and pointed to. Tensors are stored whole (not per shard),
so a checkpoint restores into any number of shards.

Inside ``ckpt-<step>``: ``manifest.json`` (format version, step, optimizer and
its hyperparameters, block size, shard count, keys with shape, dtype and
optimizer step) and ``arrays.npz`` (``p<i>`` parameters, ``s<i>.<slot>``
optimizer state, ``i`` = index of the key in the manifest).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import numpy as np

FORMAT, VERSION = "shardps-checkpoint", 1
_LATEST = "LATEST"
_NAME = re.compile(r"^ckpt-\d{8}$")
_FLOATS = {np.dtype(t).str for t in (np.float16, np.float32, np.float64)}


def save(router, path: str | os.PathLike, *, step: int = 0, keep: int = 2) -> Path:
    """Write the router's parameters and optimizer state; returns the new checkpoint's folder.

    Blocks until written. Keeps the newest ``keep`` checkpoints in ``path``.
    """
    from shardps.optim import optimizer_config

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    exports = router.call_each(lambda shard: shard.export.remote())
    layout = router.layout
    arrays, keys = {}, []
    for i, (name, spec) in enumerate(layout.keys.items()):
        flat = np.empty(spec.size, spec.dtype)
        slots = {}
        seg_step = 0
        for seg in spec.segments:
            _, _, params, state, steps = exports[seg.shard][0][spec.dtype.str]
            flat[seg.start:seg.stop] = params[seg.offset:seg.offset + seg.size]
            for slot, buf in state.items():
                slots.setdefault(slot, np.empty(spec.size, spec.dtype))[seg.start:seg.stop] = \
                    buf[seg.offset:seg.offset + seg.size]
            seg_step = int(steps[seg.index])
        arrays[f"p{i}"] = flat.reshape(spec.shape)
        arrays.update({f"s{i}.{slot}": buf.reshape(spec.shape) for slot, buf in slots.items()})
        keys.append({"name": name, "shape": list(spec.shape), "dtype": spec.dtype.str, "step": seg_step})
    manifest = {
        "format": FORMAT, "version": VERSION, "step": int(step), "num_shards": router.num_shards,
        "block_bytes": layout.partitioner.block_bytes, "optimizer": optimizer_config(router.optimizer),
        "keys": keys, "shards": [meta for _, meta in exports],
    }
    final = root / f"ckpt-{int(step):08d}"
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        with open(tmp / "arrays.npz", "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{_LATEST}.{uuid.uuid4().hex}"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / _LATEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    others = sorted((p for p in root.iterdir() if _NAME.match(p.name) and p != final), key=lambda p: p.stat().st_mtime)
    for old in others[:max(0, len(others) - (keep - 1))]:  # keep the newest, never the one just written
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``path`` (or ``path`` itself if it is one), else None."""
    root = Path(path)
    if (root / "manifest.json").is_file():
        return root
    pointer = root / _LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _NAME.match(name):
        raise ValueError(f"{pointer}: does not name a checkpoint folder: {name[:80]!r}")
    return root / name


def read(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """Load and check a checkpoint completely: ``(manifest, params, state)``.

    ``params``: name -> array; ``state``: name -> {slot: array}. Nothing is
    unpickled. Raises ``FileNotFoundError`` (no checkpoint) or ``ValueError``
    naming the file (corrupt, truncated or inconsistent).
    """
    from shardps.optim import optimizer_from_config

    folder = latest(path)
    if folder is None:
        raise FileNotFoundError(f"no checkpoint in {path} (no {_LATEST} or manifest.json)")
    manifest_path, arrays_path = folder / "manifest.json", folder / "arrays.npz"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{manifest_path}: unreadable manifest: {exc}") from exc
    _check_manifest(manifest, manifest_path)
    slots = optimizer_from_config(manifest["optimizer"]).slots()
    try:
        with np.load(arrays_path, allow_pickle=False) as npz:
            stored = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{arrays_path}: corrupt or truncated: {exc}") from exc
    params, state = {}, {}
    for i, key in enumerate(manifest["keys"]):
        want = (tuple(key["shape"]), np.dtype(key["dtype"]))
        for array_name in [f"p{i}"] + [f"s{i}.{slot}" for slot in slots]:
            got = stored.get(array_name)
            if got is None or (got.shape, got.dtype) != want:
                raise ValueError(f"{arrays_path}: array {array_name} for key {key['name']!r} is missing or not "
                                 f"{want[0]} {want[1]}")
        params[key["name"]] = stored[f"p{i}"]
        state[key["name"]] = {slot: stored[f"s{i}.{slot}"] for slot in slots}
    return manifest, params, state


def _check_manifest(m, where: Path) -> None:
    def bad(what):
        raise ValueError(f"{where}: invalid manifest: {what}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        bad(f"not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        bad(f"format version {m.get('version')!r}, this shardps reads {VERSION}")
    for field in ("step", "num_shards", "block_bytes"):
        value = m.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if field == "step" else 1):
            bad(f"{field} = {value!r}")
    if not isinstance(m.get("optimizer"), dict):
        bad("optimizer missing")
    shards = m.get("shards", [])
    if not isinstance(shards, list) or len(shards) not in (0, m["num_shards"]) or not all(
            isinstance(s, dict) and isinstance(s.get("version", 0), int)
            and isinstance(s.get("last_seq", {}), dict)
            and all(isinstance(k, str) and isinstance(v, int) for k, v in s.get("last_seq", {}).items())
            for s in shards):
        bad("shards entry")
    keys = m.get("keys")
    if not isinstance(keys, list) or not keys:
        bad("no keys")
    names = set()
    for key in keys:
        if not isinstance(key, dict) or not isinstance(key.get("name"), str) or not key["name"] or key["name"] in names:
            bad(f"key entry {str(key)[:80]}")
        names.add(key["name"])
        shape = key.get("shape")
        if not isinstance(shape, list) or len(shape) > 32 or not all(isinstance(d, int) and d > 0 for d in shape):
            bad(f"shape of {key['name']!r}: {shape!r}")
        if key.get("dtype") not in _FLOATS:
            bad(f"dtype of {key['name']!r}: {key.get('dtype')!r}")
        if not isinstance(key.get("step"), int) or key["step"] < 0:
            bad(f"step of {key['name']!r}: {key.get('step')!r}")


def restore(path: str | os.PathLike, num_shards: int | None = None, address: str | None = None, **launch_kwargs):
    """Launch shards holding a checkpoint's parameters and optimizer state; returns the Router.

    ``num_shards=None`` keeps the saved shard count; any other count
    re-shards (values and optimizer state are identical). The checkpoint is
    read and checked completely before any shard starts. Blocks until loaded.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: a corrupt, truncated or inconsistent checkpoint (names the file).
    """
    return launch_from(*read(path), num_shards=num_shards, address=address, **launch_kwargs)


def launch_from(manifest: dict, params: dict, state: dict, *, num_shards: int | None = None, **launch_kwargs):
    """:func:`restore` from what :func:`read` returned."""
    from shardps.cluster import launch
    from shardps.optim import optimizer_from_config

    launch_kwargs.setdefault("block_bytes", manifest["block_bytes"])
    ps = launch(num_shards or manifest["num_shards"], optimizer=optimizer_from_config(manifest["optimizer"]),
                **launch_kwargs)
    try:
        ps.register(params)
        ps.load_optimizer_state(state, {k["name"]: k["step"] for k in manifest["keys"]})
    except BaseException:
        ps.shutdown()
        raise
    return ps
