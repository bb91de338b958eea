"""The run directory: config.json, metrics.jsonl (one line per iteration), summary.json.

Files that a reader may trust as complete (config, summary) are written under a
temporary name and renamed; metrics.jsonl is appended and flushed line by line.
One process per run writes it (the oracle in distributed modes).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_json_atomic(path: str, obj: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunWriter:
    """Owns one run directory; only one process per run writes it."""

    def __init__(self, run_dir: str, config: dict[str, Any], tensorboard: str | None = None):
        self.run_dir = run_dir
        self.tensorboard = tensorboard  # TODO(issue 13): a scalar sink; None: metrics.jsonl only
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "config.json"), config)
        self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "w")

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()

    def summary(self, record: dict[str, Any]) -> None:
        write_json_atomic(os.path.join(self.run_dir, "summary.json"), record)

    def close(self) -> None:
        self._metrics.close()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_summary(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)
