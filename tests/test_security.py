"""A local run exposes nothing to the network: every socket its Ray listens on is bound to loopback."""
import json
import os
import subprocess
import sys
from pathlib import Path


def test_local_ray_listens_on_loopback_only():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "tests.scripts.listening"], capture_output=True, text=True,
                         timeout=300, env=env, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["addresses"]) >= 3  # at least the GCS, the raylet and the shard's worker listen
    assert all(result["loopback"]), result["addresses"]
