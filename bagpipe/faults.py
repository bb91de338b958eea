"""Deliberate faults for tests that must prove a check can fail.

Set BAGPIPE_FAULTS to a comma list, e.g. "reverse_contributions" or
"kill:server0@3" (SIGKILL server 0 at stage 3). Never set in normal runs. Each
fault breaks one rule of the contract in one place; docs/architecture.md has the
table of rules, the tests that guard them and the fault each test must catch:

- ``reverse_contributions``: row gradients summed in reverse rank order (server, owner)
- ``reverse_dense``: the dense reduction sums in reverse rank order
- ``loss_over_slice``: a trainer scales its loss by its slice, not the global batch
- ``drop_state_on_writeback``: a write-back sends zeros for the optimizer state
- ``answer_before_apply``: a server answers a stage's fetches before applying it
- ``init_by_position``: a server initialises rows from their index in its shard, not their key
- ``early_read``: the oracle lets a trainer read a row one stage before its fetch lands
- ``no_eval_flush``: the oracle does not flush changed cached rows to the servers before an evaluation
- ``lr_next:<role>``: one role takes the learning rate of the next iteration
  (roles ``server``, ``owner``, ``trainer_dense``, ``local_sparse``, ``local_dense``)
- ``kill:<role><index>@<step>``: SIGKILL a process; ``stop:<role><index>@<step>``: SIGSTOP it (a hung peer)
"""

from __future__ import annotations

import os
import signal


def _faults() -> list[str]:
    return os.environ.get("BAGPIPE_FAULTS", "").split(",")


def active(name: str) -> bool:
    return name in _faults()


def lr_iteration(role: str, iteration: int) -> int:
    """The iteration whose learning rate `role` uses: its own, or the next under `lr_next:<role>`."""
    return iteration + 1 if active(f"lr_next:{role}") else iteration


def maybe_kill(role: str, index: int, step: int) -> None:
    """SIGKILL (a real crash) or SIGSTOP (a hang) this process when the fault list names
    it at this step. Only in a job's first attempt, so a restarted job runs through."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    faults = _faults()
    for prefix, sig in (("kill", signal.SIGKILL), ("stop", signal.SIGSTOP)):
        if f"{prefix}:{role}{index}@{step}" in faults:
            os.kill(os.getpid(), sig)
