"""Smoke tests: every benchmark script runs end to end at tiny sizes and writes its outputs."""
import json

from benchmarks import ps_throughput, training_throughput


def test_ps_throughput_smoke(ray_session, tmp_path):
    rows = ps_throughput.main(["--scale", "0.0005", "--shards", "1", "2", "--workloads", "tiny", "model10x100k",
                               "--optimizers", "add", "--repeats", "1", "--min-seconds", "0", "--clients", "2",
                               "--client-pushes", "1", "--out", str(tmp_path)])
    systems = {(r["system"], r["shards"]) for r in rows}
    assert {("baseline", 1), ("shardps", 1), ("shardps", 2), ("floor", 1)} <= systems
    assert all(r["median_s"] > 0 for r in rows)
    assert any(r["clients"] == 2 for r in rows)
    for name in ("ps_throughput.csv", "ps_throughput.json", "shard_load.csv", "ps_targets.json",
                 "ps_throughput.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    loads = json.loads((tmp_path / "shard_load.json").read_text())
    assert {row["shards"] for row in loads} == {1, 2}


def test_training_throughput_smoke(ray_session, tmp_path):
    rows = training_throughput.main(["--modes", "sync", "async", "--shards", "1", "--steps", "2",
                                     "--digits-steps", "2", "--model", "mlp", "--out", str(tmp_path)])
    assert {r["mode"] for r in rows} == {"single-process", "sync", "async"}
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert (tmp_path / "training_throughput.csv").stat().st_size > 0


def test_replication_smoke(ray_session, tmp_path):
    from benchmarks import replication

    rows = replication.main(["--workloads", "tiny", "--rounds", "1", "--out", str(tmp_path)])
    assert {r["op"] for r in rows} == {"push", "pull", "push_pull"}
    assert all(r["ms"] > 0 and r["ms_replicas2"] > 0 for r in rows)
    assert (tmp_path / "replication.csv").stat().st_size > 0
