"""Checkpoints: the whole job's state at an iteration boundary (DESIGN.md section 9).

After iteration i every cached row that changed since its fetch has been flushed to
the servers (the oracle plans that stage), so the state is: the server shards (key,
value, optimizer state), the dense parameters and dense optimizer state, and the data
position. A checkpoint is a directory `iter-NNNNNNNN` (N = iterations completed):

- one *part* per writer: `server-JJJJ` (its shard as `.keys.npy`, `.values.npy`,
  `.state.npy`), `dense` (`dense.npz`: parameters `param/<name>` and optimizer state
  `optim/<index>/<key>`), `oracle` (`oracle.json`: iterations, the run's config and its
  hash); every file is written under a temporary name, fsynced and renamed, then the
  part's own manifest `<part>.part.json` (files, sizes, sha256) is written the same way;
- `MANIFEST.json`, written last by the oracle once every part is complete: the format,
  the iteration, the config hash, and every file with its size and sha256. No manifest,
  no checkpoint.

Shards are keyed, so a checkpoint does not depend on T, on where rows were cached, or
on S: a job with another S filters every shard by its own placement. Loading never
executes code from the files (NumPy arrays with `allow_pickle=False`, JSON).
docs/checkpoints.md documents the format for users.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bagpipe.config import ConfigError, RunConfig
from bagpipe.files import check_listed, fsync_dir, listing, read_manifest, sha256, write_atomic
from bagpipe.placement import Placement

FORMAT = "bagpipe-checkpoint"
VERSION = 1
MANIFEST = "MANIFEST.json"
PART_SUFFIX = ".part.json"
PREFIX = "iter-"

# what defines a run's meaning (DESIGN.md section 2): a checkpoint resumes only a run
# that agrees on all of it; everything else (iters, S, mode, cache and plan knobs,
# threads, timeouts, checkpoint settings, run directory) may change
RESULT_FIELDS = ("model", "optimizer", "data.path", "data.batch_size", "data.shuffle_seed", "cluster.trainers",
                 "seed")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete, corrupt, or of another run."""


def name_for(iterations: int) -> str:
    return f"{PREFIX}{iterations:08d}"


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The result-defining fields of a config dict, flattened by dotted path."""
    out = {}
    for path in RESULT_FIELDS:
        node: Any = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[path] = node
    return out


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(result_config(config), sort_keys=True).encode()).hexdigest()


def _differences(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [f"{path}: checkpoint {a!r}, now {b!r}"]


def check_compatible(saved: dict[str, Any], cfg: RunConfig, where: str) -> None:
    """Refuse to resume a checkpoint of a run with another meaning, naming the field."""
    now = json.loads(cfg.to_json())
    diffs = []
    for path, value in result_config(saved).items():
        diffs += _differences(value, result_config(now)[path], path)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise CheckpointError(f"{where}: written by a run with other settings, which would change the results: "
                              + "; ".join(diffs[:3]) + more + " (start a new run directory, or match them)")


def write_part(directory: str, part: str, arrays: dict[str, np.ndarray] | None = None,
               npz: dict[str, np.ndarray] | None = None, info: dict | None = None) -> None:
    """Write one writer's files (`.npy` arrays, one `.npz` bundle, or a JSON document),
    then its part manifest; the checkpoint exists only once the oracle's MANIFEST does."""
    os.makedirs(directory, exist_ok=True)
    files = []
    for name, array in (arrays or {}).items():
        files.append(f"{part}.{name}.npy")
        write_atomic(os.path.join(directory, files[-1]),
                      lambda f, a=array: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
    if npz is not None:
        files.append(f"{part}.npz")
        write_atomic(os.path.join(directory, files[-1]), lambda f: np.savez(f, **npz))
    if info is not None:
        files.append(f"{part}.json")
        write_atomic(os.path.join(directory, files[-1]),
                      lambda f: f.write(json.dumps(info, indent=2, sort_keys=True).encode()))
    write_atomic(os.path.join(directory, part + PART_SUFFIX),
                 lambda f: f.write(json.dumps(listing(directory, files)).encode()))
    fsync_dir(directory)


def finalize(directory: str, parts: list[str], iterations: int, config: dict[str, Any], timeout_s: float,
             failed=lambda: False) -> None:
    """Wait until every part is written, then write the MANIFEST (the checkpoint exists)."""
    deadline = time.monotonic() + timeout_s
    files: dict[str, dict] = {}
    for part in parts:
        path = os.path.join(directory, part + PART_SUFFIX)
        while not os.path.exists(path):
            if failed() or time.monotonic() > deadline:
                raise CheckpointError(f"{directory}: part {part!r} was not written within {timeout_s:.0f} s")
            time.sleep(0.005)
        with open(path) as f:
            files.update(json.load(f))
    manifest = {"format": FORMAT, "version": VERSION, "iterations": iterations, "config_hash": config_hash(config),
                "servers": sum(p.startswith("server-") for p in parts), "files": files}
    write_atomic(os.path.join(directory, MANIFEST),
                  lambda f: f.write(json.dumps(manifest, indent=2, sort_keys=True).encode()))
    fsync_dir(directory)


def complete(root: str) -> list[tuple[int, str]]:
    """(iterations, path) of every checkpoint under `root` that has a manifest, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and os.path.exists(os.path.join(path, MANIFEST)):
            out.append((int(name[len(PREFIX):]), path))
    return sorted(out)


def prune(root: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and any incomplete
    one older than the newest complete one (an interrupted write)."""
    done = complete(root)
    if not done:
        return
    keep_paths = {path for _, path in done[-keep:]}
    newest = done[-1][0]
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not name.startswith(PREFIX) or path in keep_paths or not name[len(PREFIX):].isdigit():
            continue
        if os.path.exists(os.path.join(path, MANIFEST)) or int(name[len(PREFIX):]) < newest:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Checkpoint:
    """A complete checkpoint, its manifest checked (sizes now; checksums as files are read)."""

    path: str
    iterations: int
    config: dict[str, Any]
    files: dict[str, dict]

    @property
    def shard_parts(self) -> list[str]:
        return sorted({name.split(".")[0] for name in self.files if name.startswith("server-")})

    def file(self, name: str) -> str:
        """Path of a listed file, after checking its size and sha256 against the manifest."""
        want = self.files.get(name)
        if want is None:
            raise CheckpointError(f"{self.path}: the manifest lists no {name}")
        return check_listed(self.path, name, want, CheckpointError)

    def array(self, name: str) -> np.ndarray:
        return np.load(self.file(name), allow_pickle=False)


def open_checkpoint(path: str) -> Checkpoint:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MANIFEST})")
    manifest = read_manifest(manifest_path, FORMAT, VERSION, CheckpointError)
    try:
        files, iterations = manifest["files"], int(manifest["iterations"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{manifest_path}: malformed: {err}") from err
    for name, want in files.items():
        check_listed(path, name, want, CheckpointError, checksum=False)  # checksums as files are read
    ckpt = Checkpoint(path, iterations, {}, files)
    with open(ckpt.file("oracle.json")) as f:
        info = json.load(f)
    ckpt.config = info["config"]
    if config_hash(ckpt.config) != manifest.get("config_hash"):
        raise CheckpointError(f"{manifest_path}: config hash does not match oracle.json")
    return ckpt


def resolve(which: str, root: str) -> Checkpoint | None:
    """`latest` (the newest complete checkpoint under root, or None) or a path."""
    if which == "latest":
        done = complete(root)
        return open_checkpoint(done[-1][1]) if done else None
    return open_checkpoint(which)


def load_rows(ckpt: Checkpoint, placement: Placement, server: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Server `server`'s rows under `placement` from every shard of the checkpoint (any S),
    as (keys ascending, values, state)."""
    keys, values, state = [], [], []
    for part in ckpt.shard_parts:
        k = ckpt.array(f"{part}.keys.npy")
        mine = placement.server_of(k) == server
        keys.append(k[mine])
        values.append(ckpt.array(f"{part}.values.npy")[mine])
        state.append(ckpt.array(f"{part}.state.npy")[mine])
    k = np.concatenate(keys)
    order = np.argsort(k, kind="stable")
    return k[order], np.concatenate(values)[order], np.concatenate(state)[order]


def dense_arrays(model, optimizer) -> dict[str, np.ndarray]:
    """The dense state as named arrays (copies: safe to write while training goes on)."""
    out = {f"param/{name}": t.detach().numpy().copy() for name, t in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    for index, param in enumerate(params):
        for key, value in optimizer.state.get(param, {}).items():
            out[f"optim/{index}/{key}"] = value.detach().numpy().copy() if hasattr(value, "numpy") else np.asarray(value)
    return out


def load_dense(ckpt: Checkpoint, model, optimizer) -> None:
    """Dense parameters and optimizer state from the checkpoint, in place."""
    import torch

    with np.load(ckpt.file("dense.npz"), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    state = {k[len("param/"):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("param/")}
    model.load_state_dict(state)
    params = [p for p in model.parameters() if p.requires_grad]
    for key, value in arrays.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            optimizer.state[params[int(index)]][name] = torch.from_numpy(value.copy())


class BackgroundWriter:
    """Writes checkpoint parts on a thread, so training goes on while bytes go to disk.
    A failed write is raised by the next `check()` (the role then fails with it)."""

    def __init__(self, who: str):
        self.who = who
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, directory: str, part: str, **contents) -> None:
        self.check()
        self._jobs.put((directory, part, contents))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            directory, part, contents = job
            try:
                write_part(directory, part, **contents)
            except BaseException as err:  # noqa: BLE001 - reported by check()
                self._error = err

    def check(self) -> None:
        if self._error is not None:
            err = self._error
            raise CheckpointError(f"{self.who}: writing a checkpoint failed: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        """Wait for every submitted write; raise if one failed."""
        self._jobs.put(None)
        self._thread.join()
        self.check()


class Committer:
    """Completes checkpoints on a thread: writes the oracle's part (the data position and
    the config), waits for every other part, writes the MANIFEST, then drops checkpoints
    beyond `keep`. Used by the oracle (distributed modes) and by `local`."""

    def __init__(self, root: str, config: dict[str, Any], parts: list[str], keep: int, timeout_s: float):
        self.root, self.config, self.parts, self.keep, self.timeout_s = root, config, parts, keep, timeout_s
        self.committed: list[int] = []
        self._error: BaseException | None = None
        self._aborting = False
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-commit", daemon=True)
        self._thread.start()

    def commit(self, iterations: int) -> None:
        self.check()
        self._jobs.put(iterations)

    def _run(self) -> None:
        while True:
            iterations = self._jobs.get()
            if iterations is None:
                return
            if self._error is not None:
                continue
            directory = os.path.join(self.root, name_for(iterations))
            try:
                write_part(directory, "oracle", info={"iterations": iterations, "config": self.config})
                finalize(directory, self.parts + ["oracle"], iterations, self.config, self.timeout_s,
                         failed=lambda: self._aborting)
                prune(self.root, self.keep)
                self.committed.append(iterations)
            except BaseException as err:  # noqa: BLE001 - reported by check()
                self._error = err

    def check(self) -> None:
        if self._error is not None:
            err = self._error
            raise CheckpointError(f"checkpoint {self.root}: {type(err).__name__}: {err}") from err

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        self.check()

    def abort(self) -> None:
        """The run failed: complete what is already written, give up waiting for the rest."""
        self._aborting = True
        self._jobs.put(None)
        self._thread.join()


def drop_incomplete(root: str) -> None:
    """Remove checkpoint directories without a manifest (a run that died writing one)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(PREFIX) and os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST)):
            shutil.rmtree(path, ignore_errors=True)
