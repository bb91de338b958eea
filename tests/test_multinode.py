"""Two torchrun "nodes" on this machine (c10d rendezvous), roles split between them:
the oracle and servers on one, the trainers on the other. Same digest as one node."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import compare, run_torchrun, train_args

pytestmark = pytest.mark.distributed  # real torchrun worlds: the slow tier


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_job_matches_one_node(tiny_data, tmp_path):
    run_torchrun(tiny_data, str(tmp_path / "one"), "bagpipe", 2, 2, "--lookahead", "4")
    port = _free_port()
    common = ["--mode", "bagpipe", "--trainers", "2", "--servers", "2", "--lookahead", "4", "--timeout", "30",
              *train_args(tiny_data, str(tmp_path / "two"))]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def node(nproc: int, roles: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "bagpipe-test",
               "-m", "bagpipe.train", *common, "--node-roles", roles]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    nodes = [node(3, "oracle=1,server=2"), node(2, "trainer=2")]
    outputs = [p.communicate(timeout=180) for p in nodes]
    for p, (out, err) in zip(nodes, outputs):
        assert p.returncode == 0, err[-4000:]
    same, message = compare(str(tmp_path / "one"), str(tmp_path / "two"))
    assert same, message


def test_multi_node_without_node_roles_is_refused(monkeypatch):
    from bagpipe.transport import local_role

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "5")
    try:
        local_role(None, servers=2, trainers=2)
    except ValueError as err:
        assert "--node-roles" in str(err)
    else:
        raise AssertionError("a multi-node job without --node-roles must be refused")
    assert local_role("oracle=1,servers=1", servers=2, trainers=2) == "oracle"
