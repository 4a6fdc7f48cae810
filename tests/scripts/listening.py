"""Run by tests/test_security.py in its own process (``python -m tests.scripts.listening``).

Starts shardps on a local Ray and prints, as JSON, every TCP address that a
process of that Ray listens on (read from /proc)."""
import ipaddress
import json
import os
import socket

import numpy as np

import shardps
from tests.procs import descendants


def socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def listening(inodes: set[str]) -> list[str]:
    """Local addresses of LISTEN sockets (state 0A) whose inode is in ``inodes``."""
    out = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:
                    continue
                host = bytes.fromhex(fields[1].split(":")[0])
                host = b"".join(host[i:i + 4][::-1] for i in range(0, len(host), 4))  # little-endian words
                out.append(socket.inet_ntop(family, host))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


if __name__ == "__main__":
    with shardps.launch(1, num_cpus=1) as ps:
        ps.register({"w": np.zeros(3, np.float32)})
        addresses = listening(socket_inodes(descendants(os.getpid()) | {os.getpid()}))
    # printed after Ray is gone, so no log line it forwards can come after the result
    print(json.dumps({"addresses": addresses, "loopback": [is_loopback(a) for a in addresses]}))
