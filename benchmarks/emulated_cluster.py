"""The ps sweep on an emulated multi-host Ray cluster, on one machine. Needs root.

Each host is a Linux network namespace joined by a veth pair to a bridge with
no IP address and no default route, so no packet leaves the private test
subnet. Host 0 runs the Ray head and the client (the benchmark driver) with
an unshaped link; hosts 1..N are parameter servers whose links are shaped
with ``tc tbf`` in both directions (default 250 Mbit/s), one shard per host;
with ``--client-hosts M``, hosts N+1..N+M each run one concurrent client
(unshaped links, like host 0's); with ``--ctr`` they run the training workers.
Every process is stopped by pid at the end (never ``ray stop``, which would
kill every Ray on the machine).

    sudo python -m benchmarks.emulated_cluster --servers 4 --out bench-out/cluster
    sudo python -m benchmarks.emulated_cluster --servers 4 --client-hosts 4 --out bench-out/clients
    sudo python -m benchmarks.emulated_cluster --servers 4 --ctr --out bench-out/cluster-ctr
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import median, print_table, write_rows
from shardps.store.wire import RAY_CONFIG

PREFIX = "sps"
SUBNET = "10.200.0"
PORT = 6391
BRIDGE = f"{PREFIX}br0"


def _ip(host: int) -> str:
    return f"{SUBNET}.{host + 1}"


def _ns(host: int) -> str:
    return f"{PREFIX}-n{host}"


def _run(*cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, env=env)


class EmulatedCluster:
    """Namespaces, links and Ray nodes for ``servers`` server hosts, the driver's host and ``clients`` client hosts.

    Server host ``i`` has Ray resources ``{"server": 1, "node<i>": 1}``,
    client host ``j`` (1-based) ``{"clienthost<j>": 1, "clienthost": 1}``.

    Use as a context manager: on exit every process in the namespaces is
    stopped by pid and the namespaces and bridge are deleted.
    """

    def __init__(self, servers: int, *, server_mbit: int = 250, client_mbit: int | None = None, clients: int = 0,
                 temp_root: str = f"/tmp/{PREFIX}c"):
        self.servers = servers
        self.clients = clients
        self.server_mbit = server_mbit
        self.client_mbit = client_mbit
        self.temp_root = Path(temp_root)
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_object_manager_pull_timeout_ms": "60000",
                    "RAY_USAGE_STATS_ENABLED": "0",
                    **{f"RAY_{k}": str(v) for k, v in RAY_CONFIG.items()}}  # as shardps's README says to start nodes

    @property
    def address(self) -> str:
        return f"{_ip(0)}:{PORT}"

    def __enter__(self) -> "EmulatedCluster":
        try:
            self._network()
            self._ray()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _network(self) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "link", "set", BRIDGE, "up")
        for host in self._hosts:
            ns, outside = _ns(host), f"{PREFIX}v{host}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", f"{PREFIX}p{host}")
            _run("ip", "link", "set", f"{PREFIX}p{host}", "netns", ns)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", f"{PREFIX}p{host}", "name", "eth0")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{_ip(host)}/24", "dev", "eth0")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            _run("ip", "link", "set", outside, "master", BRIDGE, "up")
            rate = self.server_mbit if 1 <= host <= self.servers else self.client_mbit
            if rate:
                shape = ["root", "tbf", "rate", f"{rate}mbit", "burst", "512kb", "latency", "50ms"]
                _run("tc", "qdisc", "replace", "dev", outside, *shape)  # download into the host
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", *shape)  # upload

    def _ray(self) -> None:
        common = ["--num-cpus=1", "--disable-usage-stats"]
        head = ["ray", "start", "--head", f"--node-ip-address={_ip(0)}", f"--port={PORT}",
                "--include-dashboard=false", f"--temp-dir={self.temp_root}/n0",
                "--resources", json.dumps({"client": 1})]
        _run("ip", "netns", "exec", _ns(0), *head, *common, env=self.env)
        for host in range(1, self.servers + 1):
            node = ["ray", "start", f"--address={self.address}", f"--node-ip-address={_ip(host)}",
                    "--resources", json.dumps({"server": 1, f"node{host}": 1})]
            _run("ip", "netns", "exec", _ns(host), *node, *common, env=self.env)
        for j in range(1, self.clients + 1):
            node = ["ray", "start", f"--address={self.address}", f"--node-ip-address={_ip(self.servers + j)}",
                    "--resources", json.dumps({f"clienthost{j}": 1, "clienthost": 1})]
            _run("ip", "netns", "exec", _ns(self.servers + j), *node, *common, env=self.env)
        self.in_client([sys.executable, "-c", _WAIT_FOR_NODES.format(address=self.address, ip=_ip(0),
                                                                     nodes=len(self._hosts))])

    @property
    def _hosts(self) -> range:
        return range(self.servers + self.clients + 1)

    def in_client(self, cmd: list[str], *, capture: bool = False) -> str | None:
        """Run ``cmd`` in the client host's namespace; raises on failure.

        Its output is passed through, or with ``capture`` its stdout returned (stderr passed through).
        """
        done = subprocess.run(["ip", "netns", "exec", _ns(0), *cmd], check=True, env=self.env,
                              stdout=subprocess.PIPE if capture else None, text=True)
        return done.stdout

    def close(self) -> None:
        """Stop every process in the namespaces by pid, then delete namespaces and bridge."""
        hosts = self._hosts
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = [int(p) for h in hosts for p in _run("ip", "netns", "pids", _ns(h), check=False).stdout.split()]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while pids and time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
                time.sleep(0.2)
        for host in hosts:
            _run("ip", "netns", "del", _ns(host), check=False)
            _run("ip", "link", "del", f"{PREFIX}v{host}", check=False)
        _run("ip", "link", "del", BRIDGE, check=False)
        shutil.rmtree(self.temp_root, ignore_errors=True)


_WAIT_FOR_NODES = """
import time, ray
ray.init(address="{address}", _node_ip_address="{ip}")
deadline = time.monotonic() + 120
while sum(n["Alive"] for n in ray.nodes()) < {nodes}:
    if time.monotonic() > deadline:
        raise SystemExit("nodes did not join within 120 s")
    time.sleep(0.5)
print("cluster up:", ray.cluster_resources())
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="shardps bench cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", type=int, default=4, help="server hosts (the sweep goes up to this many shards)")
    p.add_argument("--server-mbit", type=int, default=250, help="each server host's link, Mbit/s")
    p.add_argument("--client-mbit", type=int, default=0, help="the client's link, Mbit/s (0: unshaped)")
    p.add_argument("--workloads", nargs="+", default=["cnn", "big"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--client-rounds", type=int, default=5, help="measured rounds with --client-hosts")
    p.add_argument("--out", type=Path, default=Path("bench-out/cluster"))
    p.add_argument("--replication", action="store_true",
                   help="instead of the sweep: replicas=2 vs none at servers/2 shards (benchmarks.replication)")
    p.add_argument("--tables", action="store_true",
                   help="instead of the sweep: embedding tables, 1 to servers shards and the dict actor "
                        "(benchmarks.tables at 1e6 ids, dim 64, Zipf)")
    p.add_argument("--ctr", action="store_true",
                   help="instead of the sweep: CTR training (widedeep, async, one epoch), 1 to servers shards, "
                        "the workers on --client-hosts hosts of their own (default 2)")
    p.add_argument("--ctr-runs", type=_dim_batch, nargs="+", default=[(16, 256), (64, 1024), (128, 1024)],
                   metavar="DIMxBATCH", help="--ctr: embedding width x examples per worker step, one per run "
                                             "(default: 16x256 64x1024 128x1024)")
    p.add_argument("--client-hosts", type=int, default=0,
                   help="instead of the sweep: this many clients, each on a host of its own, push and pull the "
                        "first workload at once (1 to servers shards and the original actor)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces and tc)")
    if args.client_hosts < 0 or args.client_hosts == 1:
        p.error("--client-hosts must be 0 (off) or >= 2")
    if args.ctr:
        return _ctr(args)
    if args.client_hosts:
        return _client_hosts(args)
    if args.replication:
        return _replication(args)
    if args.tables:
        return _tables(args)
    shards = [s for s in (1, 2, 4, 8) if s <= args.servers]
    with EmulatedCluster(args.servers, server_mbit=args.server_mbit, client_mbit=args.client_mbit or None) as c:
        c.in_client([sys.executable, "-m", "benchmarks.ps_throughput", "--address", c.address, "--node-ip", _ip(0),
                     "--server-resources", json.dumps({"server": 0.01}), "--workloads", *args.workloads,
                     "--optimizers", "add", "--clients", "1", "--shards", *map(str, shards),
                     "--repeats", str(args.repeats), "--min-seconds", "0", "--out", str(args.out)])
    rows = json.loads((args.out / "ps_throughput.json").read_text())
    targets = speedups(rows, max(shards))
    write_rows(args.out, "cluster_targets", targets)
    print_table(targets, ["target", "value", "ok"])


def _client_hosts(args) -> None:
    """Concurrent clients on hosts of their own: aggregate push and pull of one workload at 1..servers shards."""
    shards = [s for s in (1, 2, 4, 8) if s <= args.servers]
    placement = [{f"clienthost{j}": 0.01} for j in range(1, args.client_hosts + 1)]
    with EmulatedCluster(args.servers, server_mbit=args.server_mbit, client_mbit=args.client_mbit or None,
                         clients=args.client_hosts) as c:
        c.in_client([sys.executable, "-m", "benchmarks.ps_throughput", "--address", c.address, "--node-ip", _ip(0),
                     "--server-resources", json.dumps({"server": 0.01}), "--workloads", args.workloads[0],
                     "--client-workloads", args.workloads[0], "--optimizers", "add",
                     "--clients", str(args.client_hosts), "--client-resources", json.dumps(placement),
                     "--client-pushes", "1", "--client-rounds", str(args.client_rounds), "--client-warmup", "1",
                     "--shards", *map(str, shards), "--repeats", "1", "--min-seconds", "0", "--no-plot",
                     "--out", str(args.out)])
    rows = [r for r in json.loads((args.out / "ps_throughput.json").read_text()) if r["clients"] > 1]
    mb_s = {(r["system"], r["shards"], r["op"]): r["mb_s"] for r in rows}
    targets = [{"target": f"{args.client_hosts} client hosts, {args.workloads[0]} {op}: {max(shards)} shards vs 1 "
                          f">= 3x", "value": mb_s["shardps", max(shards), op] / mb_s["shardps", 1, op],
                "ok": mb_s["shardps", max(shards), op] / mb_s["shardps", 1, op] >= 3} for op in ("push", "pull")]
    write_rows(args.out, "cluster_client_targets", targets)
    print_table(rows, ["workload", "system", "shards", "clients", "op", "mb_s", "min_mb_s", "max_mb_s", "vs_baseline"])
    print_table(targets, ["target", "value", "ok"])


def _ctr(args) -> None:
    """``shardps train --model widedeep --mode async`` over the cluster: shards on server hosts, one worker per
    client host, the driver on host 0; 1 to servers shards taking turns for ``--repeats`` rounds."""
    shards = [s for s in (1, 2, 4, 8) if s <= args.servers]
    workers = args.client_hosts or 2
    runs = []
    with EmulatedCluster(args.servers, server_mbit=args.server_mbit, client_mbit=args.client_mbit or None,
                         clients=workers) as c:
        for round_ in range(args.repeats):
            for (dim, batch), s in ((run, s) for run in args.ctr_runs for s in shards):
                cmd = [sys.executable, "-m", "shardps.cli", "train", "--model", "widedeep", "--mode", "async",
                       "--num-shards", str(s), "--num-workers", str(workers), "--address", c.address,
                       "--shard-resources", json.dumps({"server": 0.01}),
                       "--worker-resources", json.dumps({"clienthost": 0.01}), "--embedding-dim", str(dim),
                       "--batch-size", str(batch), "--json"]
                summary = json.loads(c.in_client(cmd, capture=True).splitlines()[-1])
                measured = {k: summary[k] for k in ("samples_per_s", "wall_s", "test_auc", "test_logloss")}
                runs.append({"dim": dim, "batch": batch, "shards": s, "round": round_, **measured})
                print(f"dim {dim}, batch {batch}, {s} shards, round {round_ + 1}: "
                      f"{summary['samples_per_s']:,.0f} examples/s, AUC {summary['test_auc']:.4f}", flush=True)
    write_rows(args.out, "cluster_ctr_runs", runs)
    rows = ctr_rows(runs)
    write_rows(args.out, "cluster_ctr", rows)
    print_table(rows, ["dim", "batch", "shards", "examples_s", "min_examples_s", "max_examples_s", "vs_1_shard",
                       "test_auc"])
    targets = [{"target": f"CTR training (dim {r['dim']}, batch {r['batch']}), {r['shards']} shards vs 1 >= 3x",
                "value": r["vs_1_shard"], "ok": r["vs_1_shard"] >= 3} for r in rows if r["shards"] == max(shards) > 1]
    write_rows(args.out, "cluster_ctr_targets", targets)
    print_table(targets, ["target", "value", "ok"])


def ctr_rows(runs: list[dict]) -> list[dict]:
    """Median examples/s (min, max) and test AUC per (dim, batch, shards) over rounds; the ratio to 1 shard of
    the same dim and batch (nan without such a run)."""
    rows = []
    for dim, batch, s in dict.fromkeys((r["dim"], r["batch"], r["shards"]) for r in runs):
        mine = [r for r in runs if (r["dim"], r["batch"], r["shards"]) == (dim, batch, s)]
        rate = [r["samples_per_s"] for r in mine]
        rows.append({"dim": dim, "batch": batch, "shards": s, "examples_s": median(rate), "min_examples_s": min(rate),
                     "max_examples_s": max(rate), "test_auc": median([r["test_auc"] for r in mine])})
    one = {(r["dim"], r["batch"]): r["examples_s"] for r in rows if r["shards"] == 1}
    for r in rows:
        r["vs_1_shard"] = r["examples_s"] / one.get((r["dim"], r["batch"]), float("nan"))
    return rows


def _dim_batch(text: str) -> tuple[int, int]:
    """``"64x1024"`` -> ``(64, 1024)``."""
    dim, _, batch = text.partition("x")
    if not (dim.isdigit() and batch.isdigit() and int(dim) > 0 and int(batch) > 0):
        raise argparse.ArgumentTypeError(f"expected DIMxBATCH such as 64x1024, got {text!r}")
    return int(dim), int(batch)


def _replication(args) -> None:
    """benchmarks.replication on the emulated hosts: every shard and every replica on a server host of its own."""
    with EmulatedCluster(args.servers, server_mbit=args.server_mbit, client_mbit=args.client_mbit or None) as c:
        c.in_client([sys.executable, "-m", "benchmarks.replication", "--address", c.address, "--node-ip", _ip(0),
                     "--server-resources", json.dumps({"server": 0.01}), "--shards", str(args.servers // 2),
                     "--workloads", *args.workloads, "--rounds", str(args.repeats), "--out", str(args.out)])


def _tables(args) -> None:
    """benchmarks.tables on the emulated hosts: one shard per server host, the dict actor on one too."""
    shards = [s for s in (1, 2, 4, 8) if s <= args.servers]
    with EmulatedCluster(args.servers, server_mbit=args.server_mbit, client_mbit=args.client_mbit or None) as c:
        c.in_client([sys.executable, "-m", "benchmarks.tables", "--address", c.address, "--node-ip", _ip(0),
                     "--server-resources", json.dumps({"server": 0.01}), "--vocab", "1e6", "--dims", "64",
                     "--dists", "zipf", "--shards", *map(str, shards), "--rounds", str(args.repeats),
                     "--memory-rows", "--no-numpy-baseline", "--out", str(args.out)])
    rows = [r for r in json.loads((args.out / "tables.json").read_text()) if r["system"] == "shardps"]
    rows_s = {(r["shards"], r["op"]): r["rows_s"] for r in rows}
    targets = [{"target": f"tables {op}, {max(shards)} shards vs 1 >= 3x", "value": rows_s[max(shards), op] / rows_s[1, op],
                "ok": rows_s[max(shards), op] / rows_s[1, op] >= 3} for op in ("pull_rows", "push_rows", "push_pull_rows")]
    write_rows(args.out, "cluster_table_targets", targets)
    print_table(targets, ["target", "value", "ok"])


def speedups(rows: list[dict], shards: int) -> list[dict]:
    """push+pull throughput at ``shards`` shards over 1 shard, per workload (target: >= 3x at 4)."""
    out = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        mb_s = {r["shards"]: r["mb_s"] for r in rows
                if r["workload"] == name and r["system"] == "shardps" and r["op"] == "push+pull"}
        if 1 in mb_s and shards in mb_s:
            ratio = mb_s[shards] / mb_s[1]
            out.append({"target": f"{name} push+pull, {shards} shards vs 1 >= 3x", "value": ratio, "ok": ratio >= 3})
    return out


if __name__ == "__main__":
    main()
