"""The run directory: config.json, metrics.jsonl (one line per iteration), summary.json.

Files that a reader may trust as complete (config, summary) are written under a
temporary name and renamed; metrics.jsonl is appended and flushed line by line.
One process per run writes it (the oracle in distributed modes), optionally
mirroring scalars to TensorBoard. `RunRecord` reads one back, finished or not, for
`bagpipe compare` and `bagpipe report`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from bagpipe.config import ConfigError
from bagpipe.files import write_json_atomic
from bagpipe.metrics import normalized_entropy

TENSORBOARD_EXTRA = "pip install 'bagpipe[tensorboard]'"
STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete (still running or failed)"



class ScalarSink:
    """TensorBoard scalars of a run (`--tensorboard DIR`), written beside metrics.jsonl.

    The import happens here, at construction, so a missing extra fails the run
    before training starts, with the install command in the message."""

    def __init__(self, logdir: str, config: dict[str, Any]):
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it; its own error does not name our extra)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_EXTRA} ({err})") from None
        self._writer = SummaryWriter(log_dir=logdir)
        self._batch_size = (config.get("data") or {}).get("batch_size")
        self._last_eval_step: int | None = None

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if value is not None:
            self._writer.add_scalar(tag, float(value), step)

    def _eval(self, step: int, auc: Any, logloss: Any, ctr: Any) -> None:
        self._scalar("eval/auc", auc, step)
        self._scalar("eval/logloss", logloss, step)
        if ctr is not None:
            self._scalar("eval/ne", normalized_entropy(logloss, ctr), step)
        self._last_eval_step = step

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["iter"])
        self._scalar("train/loss", record.get("loss"), step)
        for name in ("lr_sparse", "lr_dense"):
            self._scalar(f"train/{name}", record.get(name), step)
        time_iter = record.get("time_iter")
        if time_iter:
            if self._batch_size:
                self._scalar("throughput/samples_per_s", self._batch_size / time_iter, step)
            self._scalar("time/wait_share", record.get("time_wait", 0.0) / time_iter, step)
        if record.get("rows_fetched") is not None and record.get("rows_read"):
            self._scalar("cache/hit_rate", 1.0 - record["rows_fetched"] / record["rows_read"], step)
        for trainer, rows in enumerate(record.get("cache_occupancy") or ()):
            self._scalar(f"cache/occupancy/trainer_{trainer}", rows, step)
        if "eval_auc" in record:
            self._eval(step, record["eval_auc"], record.get("eval_logloss"), record.get("eval_ctr"))

    def summary(self, record: dict[str, Any]) -> None:
        """The final evaluation (distributed runs evaluate only here) and the run's rates."""
        step = max(int(record.get("iters") or 0) - 1, 0)
        if self._last_eval_step != step and record.get("auc") is not None:
            self._eval(step, record["auc"], record.get("logloss"), record.get("eval_ctr"))
        self._scalar("run/samples_per_s", record.get("samples_per_s"), step)
        self._scalar("run/wait_share", record.get("wait_share"), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class RunWriter:
    """Owns one run directory; only one process per run writes it.

    Callers close() when the loop ends (also on failure) and then write summary():
    so close() only flushes the TensorBoard sink and summary() closes it."""

    def __init__(self, run_dir: str, config: dict[str, Any], tensorboard: str | None = None, keep_below: int = 0):
        """`keep_below`: a resumed run keeps the records of iterations before it (and only
        those), so metrics.jsonl ends up with every iteration exactly once."""
        self.run_dir = run_dir
        self.tensorboard = tensorboard
        self._scalars = ScalarSink(tensorboard, config) if tensorboard else None
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, "config.json"), config)
        path = os.path.join(run_dir, "metrics.jsonl")
        kept = []
        if keep_below and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line torn by a killed job: what came before counts
                        break
                    if record.get("iter", keep_below) < keep_below:
                        kept.append(record)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        os.replace(tmp, path)
        self._metrics = open(path, "a")

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()
        if self._scalars is not None:
            self._scalars.log(record)

    def summary(self, record: dict[str, Any]) -> None:
        write_json_atomic(os.path.join(self.run_dir, "summary.json"), record)
        if self._scalars is not None:
            self._scalars.summary(record)
            self._scalars.close()
            self._scalars = None

    def close(self) -> None:
        self._metrics.close()
        if self._scalars is not None:
            self._scalars.flush()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_summary(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


class RunDirError(ValueError):
    """A path that is not a readable run directory (yet)."""


def _read_metrics_lines(path: str) -> list[dict[str, Any]]:
    """metrics.jsonl as records; a half-written last line (a live run) is left out."""
    with open(path) as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline yet: the writer is mid-line
                break
            raise RunDirError(f"{path}: line {number} is not JSON") from None
    return records


@dataclass(frozen=True)
class RunRecord:
    """One run directory as read now: finished, failed or still running."""

    path: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None  # None until the run finishes successfully
    job_status: dict[str, Any] | None = None  # status.json, where the job writes one

    @classmethod
    def load(cls, path: str) -> "RunRecord":
        if not os.path.isdir(path):
            raise RunDirError(f"{path}: no such run directory")
        config_path, metrics_path = os.path.join(path, "config.json"), os.path.join(path, "metrics.jsonl")
        if not os.path.exists(config_path):
            raise RunDirError(f"{path}: no config.json (not a run directory)")
        if not os.path.exists(metrics_path):
            raise RunDirError(f"{path}: no metrics.jsonl (the run has not started training)")
        metrics = [m for m in _read_metrics_lines(metrics_path) if "iter" in m]
        if not metrics:
            raise RunDirError(f"{path}: metrics.jsonl has no iterations yet")
        with open(config_path) as f:
            config = json.load(f)
        summary = read_summary(path) if os.path.exists(os.path.join(path, "summary.json")) else None
        status_path = os.path.join(path, "status.json")
        job_status = None
        if os.path.exists(status_path):
            with open(status_path) as f:
                job_status = json.load(f)
        return cls(path, config, metrics, summary, job_status)

    @property
    def complete(self) -> bool:
        return self.summary is not None

    @property
    def status(self) -> str:
        """complete, or what the job last said of itself (status.json), else incomplete."""
        if self.complete:
            return STATUS_COMPLETE
        said = (self.job_status or {}).get("status")
        if said == "failed":
            where, why = self.job_status.get("where"), self.job_status.get("why")
            return "failed" + (f" ({where}: {why})" if where or why else "")
        if said == "running":
            return "running (or killed before it could say)"
        return STATUS_INCOMPLETE

    @property
    def mode(self) -> str:
        return str((self.config.get("cluster") or {}).get("mode", "?"))

    @property
    def batch_size(self) -> int | None:
        return (self.config.get("data") or {}).get("batch_size")

    @property
    def iterations(self) -> np.ndarray:
        return np.array([m["iter"] for m in self.metrics], dtype=np.int64)

    def has(self, name: str) -> bool:
        return any(name in m for m in self.metrics)

    def column(self, name: str) -> np.ndarray:
        """One per-iteration field as float64, NaN where an iteration lacks it."""
        return np.array([m.get(name, np.nan) for m in self.metrics], dtype=np.float64)

    def describe(self) -> str:
        return f"{self.path}: {self.status}, {len(self.metrics)} iterations"

    def eval_points(self) -> "EvalPoints":
        """Every evaluation: those recorded during training (local --eval-every) and the
        final one in summary.json, placed at the last iteration."""
        rows = [(m["iter"], m["eval_auc"], m.get("eval_logloss"), m.get("eval_ctr"))
                for m in self.metrics if "eval_auc" in m]
        if self.summary is not None and self.summary.get("auc") is not None:
            last = int(self.metrics[-1]["iter"])
            if not rows or rows[-1][0] != last:
                rows.append((last, self.summary["auc"], self.summary.get("logloss"), self.summary.get("eval_ctr")))
        table = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64).reshape(-1, 4)
        ne = np.array([normalized_entropy(ll, ctr) for _, _, ll, ctr in table], dtype=np.float64)
        return EvalPoints(table[:, 0].astype(np.int64), table[:, 1], table[:, 2], ne)


@dataclass(frozen=True)
class EvalPoints:
    """A run's evaluations: at which iteration, and AUC / logloss / NE (NaN when the
    run dir lacks the eval click rate NE needs)."""

    iters: np.ndarray
    auc: np.ndarray
    logloss: np.ndarray
    ne: np.ndarray

    def at(self, iteration: int) -> dict[str, float]:
        k = int(np.flatnonzero(self.iters == iteration)[-1])
        return {"auc": float(self.auc[k]), "logloss": float(self.logloss[k]), "ne": float(self.ne[k])}

    def final(self) -> dict[str, float] | None:
        """The latest evaluation (of a complete run: its final one), or None."""
        return self.at(int(self.iters[-1])) if self.iters.size else None
