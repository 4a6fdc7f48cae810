"""Smoke tests: every benchmark script runs end to end at tiny sizes and writes its outputs."""
import json

import numpy as np
import pytest
import ray

from benchmarks import ps_throughput, training_throughput


def test_ps_throughput_smoke(ray_session, tmp_path):
    rows = ps_throughput.main(["--scale", "0.0005", "--shards", "1", "2", "--workloads", "tiny", "model10x100k",
                               "--optimizers", "add", "--repeats", "1", "--min-seconds", "0", "--clients", "2",
                               "--client-pushes", "1", "--client-rounds", "2", "--client-warmup", "1",
                               "--out", str(tmp_path)])
    systems = {(r["system"], r["shards"]) for r in rows}
    assert {("baseline", 1), ("shardps", 1), ("shardps", 2), ("floor", 1)} <= systems
    assert all(r["median_s"] > 0 for r in rows)
    many = [r for r in rows if r["clients"] == 2]
    assert {r["op"] for r in many} == {"push", "pull"} and all(r["rounds"] == 2 for r in many)
    assert {r["system"] for r in many} == {"baseline", "shardps", "shardps-unchecked"}
    assert all(r["min_mb_s"] <= r["mb_s"] <= r["max_mb_s"] for r in many)
    for name in ("ps_throughput.csv", "ps_throughput.json", "shard_load.csv", "ps_targets.json",
                 "ps_throughput.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    loads = json.loads((tmp_path / "shard_load.json").read_text())
    assert {row["shards"] for row in loads} == {1, 2}


def test_warm_calls_move_the_store_through_every_process():
    from benchmarks.common import WARM_STORE, warm_calls

    calls = warm_calls(100, 4 * 10**6, processes=2)
    assert calls * 4 * 10**6 >= WARM_STORE * 100 * 10**6 * 2 > (calls - 1) * 4 * 10**6
    assert warm_calls(100, 100, processes=2) == 0  # inline payloads never touch the store
    assert warm_calls(100, 2 * 10**6, most=7) == 7
    assert warm_calls(None, 4 * 10**6) == 0  # a joined cluster: not warmed


def test_check_cost_variants_apply_the_push_and_only_the_fused_in_place_one_is_not_all_or_nothing():
    from benchmarks import check_cost
    from shardps.store.update import CHUNK

    size = 2 * CHUNK + 5
    rng = np.random.default_rng(1)
    p0, g = rng.standard_normal(size).astype(np.float32), rng.standard_normal(size).astype(np.float32)
    bad = g.copy()
    bad[-1] = np.nan  # in the last chunk: the in-place variant has applied the others by then
    changed = {}
    for name, fn in check_cost.variants(size).items():
        state = {"p": p0.copy(), "q": np.zeros(size, np.float32), "g": g}
        fn(state)
        np.testing.assert_array_equal(state["p"], p0 + g, err_msg=name)
        state = {"p": p0.copy(), "q": np.zeros(size, np.float32), "g": bad}
        if name == "add":
            continue
        with pytest.raises(ValueError):
            fn(state)
        changed[name] = not np.array_equal(state["p"], p0)
    assert changed == {"check, add": False, "fused, second buffer": False, "fused, in place": True}
    rows = check_cost.main(["--mb", "0.5", "--rounds", "2"])
    assert {r["variant"] for r in rows} == set(changed) | {"add"} and all(r["ms"] > 0 for r in rows)


def test_training_throughput_smoke(ray_session, tmp_path):
    rows = training_throughput.main(["--modes", "async", "--shards", "1", "--datasets", "digits",  # (modes: a flag)
                                     "--digits-steps", "2", "--model", "mlp", "--rounds", "1", "--out", str(tmp_path)])
    assert {r["mode"] for r in rows} == {"keras-fit", "single-process", "async"}
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert all(r["ms_compute"] > 0 and r["ms_pull"] > 0 and r["ms_push"] > 0 for r in rows if r["shards"])
    assert (tmp_path / "training_throughput.csv").stat().st_size > 0


def test_replication_smoke(ray_session, tmp_path):
    from benchmarks import replication

    rows = replication.main(["--workloads", "tiny", "--rounds", "1", "--out", str(tmp_path)])
    assert {r["op"] for r in rows} == {"push", "pull", "push_pull"}
    assert all(r["ms"] > 0 and r["ms_replicas2"] > 0 for r in rows)
    assert (tmp_path / "replication.csv").stat().st_size > 0


def test_tables_smoke(ray_session, tmp_path):
    from benchmarks import tables

    rows = tables.main(["--vocab", "2600", "--dims", "4", "--dists", "zipf", "--shards", "1", "2", "--examples", "64",
                        "--batches", "2", "--warmup", "1", "--rounds", "1", "--memory-rows", "1000", "--out",
                        str(tmp_path)])
    assert {(r["system"], r["shards"]) for r in rows} == {("dict actor", 1), ("numpy in-process", 1), ("shardps", 1),
                                                          ("shardps", 2)}
    assert {r["op"] for r in rows} == set(tables.OPS)
    assert all(r["median_s"] > 0 and 0 < r["unique_fraction"] <= 1 for r in rows)
    loads = json.loads((tmp_path / "table_load.json").read_text())
    assert [load["rows"] for load in loads] == [loads[0]["rows"]] * 2  # the same pushes, the same rows
    memory = json.loads((tmp_path / "table_memory.json").read_text())
    assert memory[0]["rows"] == 1000 and memory[0]["bytes_per_row"] > memory[0]["raw_plus_optimizer"]
    for name in ("tables.csv", "table_targets.json", "tables.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_table_batches_follow_the_distribution():
    from benchmarks.tables import batches

    zipf, = batches(26_000, fields=26, examples=2000, count=1, dist="zipf")
    uniform, = batches(26_000, fields=26, examples=2000, count=1, dist="uniform")
    fields = zipf.reshape(2000, 26) // 1000
    assert (fields == np.arange(26)).all()  # each field draws from its own id range
    assert len(np.unique(zipf)) < 0.5 * len(np.unique(uniform))  # Zipf repeats its head ids
    head = np.mean(zipf.reshape(2000, 26)[:, 0] == 0)
    assert 0.1 < head < 0.3  # P(rank 1) = 1 / H(1000, 1.15) ~ 0.19


def test_ctr_throughput_smoke(ray_session, tmp_path):
    from benchmarks import ctr_throughput

    rows = ctr_throughput.main(["--rounds", "1", "--steps", "2", "--shards", "1", "--modes", "sync",
                                "--num-train", "3000", "--out", str(tmp_path)])
    assert {(r["mode"], r["shards"]) for r in rows} == {("one process", 0), ("sync", 1)}
    sync, = [r for r in rows if r["mode"] == "sync"]
    assert sync["examples_per_s"] > 0 and 0 < sync["bytes_per_example"] < sync["whole_tables_bytes_per_example"]
    assert (tmp_path / "ctr_throughput.csv").stat().st_size > 0


def test_cpu_accounting_smoke(ray_session):
    from benchmarks import cpu_accounting

    rows = cpu_accounting.main(["--shards", "1", "--clients", "1", "--calls", "20", "--workload", "model10x100k",
                                "--ops", "push", "pull", "--rounds", "1", "--object-store-mb", "50"])
    assert [(r["system"].split()[0], r["op"]) for r in rows] == \
        [("baseline", "push"), ("shardps", "push"), ("baseline", "pull"), ("shardps", "pull")]
    assert all(r["wall_ms_per_call"] > 0 for r in rows)
    # /proc counts CPU in 10 ms ticks: one row may see none, 80 calls of 4 MB all together do
    assert sum(r["total_cpu_ms_per_call"] for r in rows) > 0


def test_profile_push_smoke(ray_session):
    from benchmarks import profile_push

    rows = profile_push.main(["--workload", "tiny", "--shards", "1", "2", "--repeats", "3"])
    assert [r["system"] for r in rows] == ["baseline", "shardps 1 shard(s), add", "shardps 2 shard(s), add"]
    assert all(r["push_ms"] > 0 and r["in_server_ms"] > 0 for r in rows)
    assert ray.is_initialized()  # it left the shared Ray session running


def test_criteo_read_benchmark_checks_its_reader_against_pandas_and_reports_both(tmp_path):
    from benchmarks import criteo_read

    criteo_read.main(["--rows", "300", "--rounds", "1", "--gzip", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "criteo_read.json").read_text())
    assert {(r["file"], r["reader"]) for r in rows} == {(f, r) for f in ("clicks.txt", "clicks.txt.gz")
                                                        for r in ("shardps criteo.read", "pandas + Python loop")}
    assert all(r["rows_per_s"] > 0 for r in rows)


def test_criteo_training_benchmark_trains_and_reports_each_configuration(ray_session, tmp_path):
    from benchmarks import criteo_training

    criteo_training.main(["--rows", "800", "--steps", "3", "--shards", "1", "2", "--modes", "async",
                          "--rounds", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "criteo_training.json").read_text())
    assert [(r["mode"], r["shards"]) for r in rows] == [("async", 1), ("async", 2)]
    assert all(r["examples_per_s"] > 0 and r["table_rows"] > 0 and 0 <= r["test_auc"] <= 1 for r in rows)


def test_ctr_peers_reports_medians_and_ratios_to_the_references_of_the_same_batch():
    from benchmarks.ctr_peers import _rows

    def run(speed, auc=0.8):
        return {"examples_per_s": speed, "train_s": 1.0, "total_s": 2.0, "test_auc": auc, "test_logloss": 0.47}

    runs = {("keras", 256): [run(100), run(300), run(200)], ("pss-1", 256): [run(50)],
            ("shardps-async-1", 256): [run(400, 0.7), run(600, 0.9)], ("keras", 2048): [run(1000)]}
    rows = {(r["peer"], r["batch"]): r for r in _rows(runs)}
    assert rows["keras", 256]["examples_per_s"] == 200 and rows["keras", 256]["min"] == 100
    mine = rows["shardps-async-1", 256]
    assert mine["examples_per_s"] == 500 and mine["test_auc"] == 0.8
    assert mine["vs_keras"] == 2.5 and mine["vs_pss_1"] == 10 and "vs_keras_bare" not in mine
    assert rows["keras", 2048]["vs_keras"] == 1 and "vs_pss_1" not in rows["keras", 2048]  # only its own batch


def test_cluster_ctr_rows_take_medians_and_compare_each_run_with_one_shard_of_the_same_dim_and_batch():
    from benchmarks.emulated_cluster import _dim_batch, ctr_rows

    def run(dim, batch, shards, speed, auc=0.8):
        return {"dim": dim, "batch": batch, "shards": shards, "samples_per_s": speed, "test_auc": auc}

    runs = [run(16, 256, 1, 100), run(16, 256, 1, 300), run(16, 256, 1, 200), run(16, 256, 4, 500, 0.7),
            run(16, 256, 4, 700, 0.9), run(64, 1024, 1, 10), run(64, 1024, 4, 45), run(64, 256, 4, 50)]
    rows = {(r["dim"], r["batch"], r["shards"]): r for r in ctr_rows(runs)}
    assert rows[16, 256, 1]["examples_s"] == 200 and rows[16, 256, 1]["min_examples_s"] == 100
    assert rows[16, 256, 4]["examples_s"] == 600 and rows[16, 256, 4]["test_auc"] == 0.8
    assert rows[16, 256, 4]["vs_1_shard"] == 3 and rows[64, 1024, 4]["vs_1_shard"] == 4.5
    assert np.isnan(rows[64, 256, 4]["vs_1_shard"])  # no 1-shard run of that batch
    assert _dim_batch("64x1024") == (64, 1024)
    with pytest.raises(Exception, match="DIMxBATCH"):
        _dim_batch("64")
