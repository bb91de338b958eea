"""Deliberate faults for tests that must prove a check can fail.

Set BAGPIPE_FAULTS to a comma list, e.g. "reverse_contributions" or
"kill:server0@3" (SIGKILL server 0 at stage 3). Never set in normal runs.
"""

from __future__ import annotations

import os
import signal


def active(name: str) -> bool:
    return name in os.environ.get("BAGPIPE_FAULTS", "").split(",")


def maybe_kill(role: str, index: int, step: int) -> None:
    """SIGKILL this process when the fault list names it at this step: a real crash."""
    if f"kill:{role}{index}@{step}" in os.environ.get("BAGPIPE_FAULTS", "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)
