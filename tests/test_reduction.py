"""The sharded rank-order dense reduction gives the sequential sum's exact bits
(real gloo processes, so it sits in the slow tier)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.distributed
def test_sharded_reduction_is_bit_identical_and_flat_in_bytes(tmp_path):
    out = tmp_path / "rows.json"
    # 1001 floats do not split evenly over 3 (or 4) shards: the padding must not leak
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_dense_reduction.py"),
                           "--trainers", "1,3,4", "--params", "1001", "--repeats", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    assert all(r["new_bit_identical"] and r["old_bit_identical"] for r in rows)
    three, four = rows[1], rows[2]
    assert four["old_bytes"] > three["old_bytes"] and four["new_bytes"] < 2 * 2 * 4 * 1001
