"""Every rule of the contract (DESIGN.md section 2) guarded by a test that a fault fails.

All runs share one configuration: T=3 trainers, S=2 servers, Adagrad, the DLRM
learning-rate schedule (warmup, constant, polynomial decay: a rate that changes
every iteration), and in `bagpipe` mode a tight cache (capacity evictions in most
iterations). `local`, `none` and `bagpipe` must agree bit for bit; each deliberate
fault (bagpipe.faults) breaks one rule in one role and must change the digest.
The table in docs/architecture.md lists rule, test and fault.
"""

import json

import pytest

from conftest import compare, run_local, run_torchrun

pytestmark = pytest.mark.distributed

ITERS = 12
SCHEDULE = ["--lr-schedule", "dlrm", "--warmup-iters", "3", "--decay-start", "6", "--decay-iters", "5"]
CACHE = ["--cache-rows", "90", "--lookahead", "7"]  # near the minimum at T=3: evicts every iteration


def _args(optimizer="adagrad"):
    return ["--optimizer", optimizer, *SCHEDULE]


def _run(data, run_dir, mode, optimizer="adagrad"):
    if mode == "local":
        run_local(data, run_dir, "--trainers", "3", *_args(optimizer), iters=ITERS)
    else:
        run_torchrun(data, run_dir, mode, 3, 2, *_args(optimizer), *(CACHE if mode == "bagpipe" else ()),
                     iters=ITERS)
    return run_dir


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    return _run(tiny_data, str(tmp_path_factory.mktemp("reference") / "local"), "local")


def _metrics(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad"])
def test_modes_agree_under_a_changing_learning_rate(tiny_data, tmp_path, optimizer):
    runs = {mode: _run(tiny_data, str(tmp_path / mode), mode, optimizer) for mode in ("local", "none", "bagpipe")}
    for mode in ("none", "bagpipe"):
        same, message = compare(runs["local"], runs[mode])
        assert same, f"{mode}: {message}"
    expected = [0.1 * s for s in (1 / 3, 2 / 3, 1, 1, 1, 1, 1, 0.64, 0.36, 0.16, 0.04, 0.0)]
    for mode, run in runs.items():
        metrics = _metrics(run)
        for key in ("lr_sparse", "lr_dense"):
            assert [m[key] for m in metrics] == pytest.approx(expected, abs=1e-12), f"{mode} {key}"
    if optimizer == "adagrad":
        assert sum(m.get("plan_capacity_evictions", 0) > 0 for m in _metrics(runs["bagpipe"])) >= ITERS // 2
        with open(f"{runs['bagpipe']}/config.json") as f:
            assert json.load(f)["optimizer"]["schedule"] == {"kind": "dlrm", "warmup_iters": 3, "decay_start": 6,
                                                             "decay_iters": 5}


# (fault, mode it runs in): each breaks one rule in one place
FAULTS = [
    ("lr_next:server", "none"),  # rule 4: the rate of the iteration, on the servers
    ("lr_next:owner", "bagpipe"),  # ... on the cache owners
    ("lr_next:trainer_dense", "none"),  # ... in the trainers' dense step
    ("lr_next:local_sparse", "local"),  # ... in local's row update
    ("lr_next:local_dense", "local"),  # ... in local's dense step
    ("reverse_dense", "none"),  # rule 2: the dense reduction's rank order
    ("reverse_contributions", "bagpipe"),  # rule 3: row gradients in rank order (owners)
    ("reverse_contributions", "none"),  # ... on the servers
    ("loss_over_slice", "bagpipe"),  # rule 1: the loss scaled by the global batch
    ("drop_state_on_writeback", "bagpipe"),  # rule 4: optimizer state travels with the row
    ("answer_before_apply", "none"),  # reads see every earlier update
    ("init_by_position", "none"),  # rule 5: initialisation from the key, not where the row lives
]


@pytest.mark.parametrize("fault,mode", FAULTS, ids=[f"{f}-{m}" for f, m in FAULTS])
def test_a_broken_rule_changes_the_digest(tiny_data, tmp_path, monkeypatch, reference, fault, mode):
    monkeypatch.setenv("BAGPIPE_FAULTS", fault)
    faulty = _run(tiny_data, str(tmp_path / "faulty"), mode)
    same, message = compare(reference, faulty)
    assert not same, f"{fault} in {mode} mode went unnoticed: {message}"
    assert "first difference at iteration" in message or "final digests differ" in message
