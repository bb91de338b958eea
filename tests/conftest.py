"""Shared fixtures: one tiny synthetic dataset, and helpers that run real jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TINY_TABLES = [50, 200, 1000, 30, 5000]
# batch 60 is not a power of two and divides among 1, 2 and 3 trainers
TINY_BATCH = 60
SMALL_MODEL = ["--embedding-dim", "8", "--bottom-mlp", "16,8", "--top-mlp", "16", "--deep-mlp", "16"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    from bagpipe.datasets.synthetic import generate_synthetic

    out = str(tmp_path_factory.mktemp("data") / "tiny")
    generate_synthetic(out, 3000, seed=1, tables=TINY_TABLES, eval_rows=600, rows_per_part=1000, progress=False)
    return out


def train_args(data: str, run_dir: str, *extra: str, iters: int = 8, batch: int = TINY_BATCH) -> list[str]:
    return ["--data", data, "--run-dir", run_dir, "--batch-size", str(batch), "--iters", str(iters),
            "--eval-batches", "4", *SMALL_MODEL, *extra]


def run_local(data: str, run_dir: str, *extra: str, **kw) -> dict:
    from bagpipe.train import main

    assert main(["--mode", "local", *train_args(data, run_dir, *extra, **kw)]) == 0
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def run_torchrun(data: str, run_dir: str, mode: str, trainers: int, servers: int, *extra: str,
                 timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """A real torchrun world on this machine: 1 oracle + S servers + T trainers."""
    from bagpipe.launch import torchrun_flags

    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(trainers, servers), "-m", "bagpipe.train",
           "--mode", mode, "--trainers", str(trainers), "--servers", str(servers),
           "--timeout", "30", *train_args(data, run_dir, *extra, **kw)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def compare(run_a: str, run_b: str) -> tuple[bool, str]:
    from bagpipe.compare import compare_runs

    return compare_runs(run_a, run_b)


@pytest.fixture(scope="session")
def bad_id_data(tiny_data, tmp_path_factory) -> str:
    """The tiny dataset with one id of table C2 outside its cardinality (200)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path_factory.mktemp("data") / "bad_ids")
    shutil.copytree(tiny_data, out)
    part = os.path.join(out, "part-00001.parquet")
    table = pq.read_table(part)
    ids = table.column("C2").to_numpy().copy()
    ids[17] = 999
    table = table.set_column(table.schema.get_field_index("C2"), "C2", pa.array(ids))
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), part)
    return out
