"""Files a reader may trust: written under a temporary name, fsynced, renamed; and
manifests that list files with their sizes and checksums (checkpoints, exports)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable


def write_atomic(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write `path` through `write(file)` so that it appears complete or not at all."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"), mode="w")


def fsync_dir(directory: str) -> None:
    """Make the renames in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def listing(directory: str, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of files in `directory`: what a manifest records."""
    return {name: {"bytes": os.path.getsize(os.path.join(directory, name)),
                   "sha256": sha256(os.path.join(directory, name))} for name in names}


def read_manifest(path: str, fmt: str, version: int, error: type[Exception]) -> dict:
    """A manifest's JSON, checked to be of `fmt` and `version` (else `error`, naming the file)."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise error(f"{path}: unreadable or malformed: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != fmt or manifest.get("version") != version:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        raise error(f"{path}: format {found[0]!r} version {found[1]!r}, expected {fmt!r} version {version}")
    return manifest


def check_listed(directory: str, name: str, want: dict, error: type[Exception], checksum: bool = True) -> str:
    """The path of a listed file, after checking its size (and sha256) against the manifest."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path) or os.path.getsize(path) != want["bytes"]:
        raise error(f"{path}: missing or truncated (the manifest says {want['bytes']} bytes)")
    if checksum and sha256(path) != want["sha256"]:
        raise error(f"{path}: missing, truncated or changed since it was written (sha256 differs from the manifest)")
    return path
