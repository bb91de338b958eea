"""The trainer <-> server stage protocol: frames, their layouts, and both sides' helpers.

Per stage s (DESIGN.md section 4) every trainer sends every server exactly one
`STAGE` frame (gradients of iteration s in `none` mode, write-backs with state in
`bagpipe` mode, at a checkpoint the flushed rows with state, keys to fetch), and
every server answers every trainer with one `ANSWER` frame (the fetched rows, with
state when they go into a cache).

A frame is one uint8 tensor: an int64 header [MAGIC, stage, kind, source, key
bytes, n0, n1, n2, n3], then the key arrays (int32 when every key fits, else int64), then
the fp32 arrays, in a layout both sides derive from the plan. The receiver checks
the header, so a size, stage or sender mismatch is an error naming both, never a
stale buffer tail (gloo receives into a too-large buffer without complaint).
Receives are posted before sends are waited on (gloo's isend completes only once
the peer posts its receive).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
import torch.distributed as dist

from bagpipe.errors import PeerError
from bagpipe.placement import Placement
from bagpipe.plan import key_dtype
from bagpipe.transport import posted, wait

MAGIC = 0x0BA9_917E
HEADER_WORDS = 9
COUNTS = 4  # sections counted in a header
HEADER_BYTES = 8 * HEADER_WORDS


class FrameKind(IntEnum):
    STAGE = 1  # trainer -> server
    ANSWER = 2  # server -> trainer


@dataclass
class StageMessage:
    """One trainer's stage frame to one server, decoded (arrays are views)."""

    grad_keys: np.ndarray
    grads: np.ndarray  # fp32 [n_grad, row_dim]
    writeback_keys: np.ndarray
    writeback_values: np.ndarray  # fp32 [n_wb, row_dim]
    writeback_state: np.ndarray  # fp32 [n_wb, state_dim]
    flush_keys: np.ndarray  # rows that stay cached: their value and state at a checkpoint
    flush_values: np.ndarray
    flush_state: np.ndarray
    fetch_keys: np.ndarray

    @property
    def counts(self) -> tuple[int, int, int, int]:
        return len(self.grad_keys), len(self.writeback_keys), len(self.flush_keys), len(self.fetch_keys)


@dataclass
class Answer:
    """One server's answer to one trainer's fetches, decoded."""

    keys: np.ndarray
    values: np.ndarray  # fp32 [n, row_dim]
    state: np.ndarray | None  # fp32 [n, state_dim] when the rows go into a cache


@dataclass(frozen=True)
class FrameLayout:
    """Sizes and dtypes both sides derive from (row_dim, state_dim, total rows)."""

    row_dim: int
    state_dim: int
    total_rows: int

    @property
    def key_dtype(self) -> np.dtype:
        return key_dtype(self.total_rows)

    def stage_bytes(self, counts: tuple[int, int, int, int]) -> int:
        n_grad, n_wb, n_flush, n_fetch = counts
        floats = (n_grad + n_wb + n_flush) * self.row_dim + (n_wb + n_flush) * self.state_dim
        return HEADER_BYTES + self.key_dtype.itemsize * (n_grad + n_wb + n_flush + n_fetch) + 4 * floats

    def answer_bytes(self, n: int, with_state: bool) -> int:
        floats = n * (self.row_dim + (self.state_dim if with_state else 0))
        return HEADER_BYTES + self.key_dtype.itemsize * n + 4 * floats

    # --- pack / unpack -------------------------------------------------------------------
    def _pack(self, stage: int, kind: FrameKind, src: int, counts: tuple[int, ...],
              keys: list[np.ndarray], floats: list[np.ndarray]) -> torch.Tensor:
        counts = tuple(counts) + (0,) * (COUNTS - len(counts))
        header = np.array([MAGIC, stage, int(kind), src, self.key_dtype.itemsize, *counts], dtype=np.int64)
        parts = [header.view(np.uint8)]
        parts += [np.ascontiguousarray(k, dtype=self.key_dtype).view(np.uint8).ravel() for k in keys]
        parts += [np.ascontiguousarray(f, dtype=np.float32).view(np.uint8).ravel() for f in floats]
        return torch.from_numpy(np.concatenate(parts))

    def _unpack(self, buf: torch.Tensor, stage: int, kind: FrameKind, src: int, counts: tuple[int, ...],
                key_counts: list[int], float_counts: list[int], who: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        raw = buf.numpy()
        if raw.size < HEADER_BYTES:
            raise PeerError(f"{who}: a message of {raw.size} bytes has no header")
        header = raw[:HEADER_BYTES].view(np.int64)
        counts = tuple(counts) + (0,) * (COUNTS - len(counts))
        want = (stage, int(kind), src, counts, self.key_dtype.itemsize)
        got = (int(header[1]), int(header[2]), int(header[3]), tuple(int(x) for x in header[5:]), int(header[4]))
        if int(header[0]) != MAGIC or got != want:
            raise PeerError(
                f"{who}: unexpected message header (stage, kind, source, counts, key bytes) {got}, expected {want} "
                f"(magic {'ok' if int(header[0]) == MAGIC else 'bad'}): sender and plan disagree")
        pos, width = HEADER_BYTES, self.key_dtype.itemsize
        keys, floats = [], []
        for n in key_counts:
            keys.append(raw[pos:pos + width * n].view(self.key_dtype).astype(np.int64))
            pos += width * n
        for n in float_counts:
            floats.append(raw[pos:pos + 4 * n].view(np.float32))
            pos += 4 * n
        return keys, floats

    def pack_stage(self, stage: int, src: int, msg: StageMessage) -> torch.Tensor:
        return self._pack(stage, FrameKind.STAGE, src, msg.counts,
                          [msg.grad_keys, msg.writeback_keys, msg.flush_keys, msg.fetch_keys],
                          [msg.grads, msg.writeback_values, msg.writeback_state, msg.flush_values, msg.flush_state])

    def unpack_stage(self, buf: torch.Tensor, stage: int, src: int, counts: tuple[int, int, int, int],
                     who: str) -> StageMessage:
        n_grad, n_wb, n_flush, _ = counts
        d, s = self.row_dim, self.state_dim
        (gk, wk, lk, fk), (g, wv, ws, lv, ls) = self._unpack(
            buf, stage, FrameKind.STAGE, src, counts, list(counts),
            [n_grad * d, n_wb * d, n_wb * s, n_flush * d, n_flush * s], who)
        return StageMessage(gk, g.reshape(n_grad, d), wk, wv.reshape(n_wb, d), ws.reshape(n_wb, s), lk,
                            lv.reshape(n_flush, d), ls.reshape(n_flush, s), fk)

    def pack_answer(self, stage: int, src: int, answer: Answer) -> torch.Tensor:
        floats = [answer.values] + ([answer.state] if answer.state is not None else [])
        return self._pack(stage, FrameKind.ANSWER, src, (len(answer.keys), int(answer.state is not None), 0),
                          [answer.keys], floats)

    def unpack_answer(self, buf: torch.Tensor, stage: int, src: int, n: int, with_state: bool, who: str) -> Answer:
        d, s = self.row_dim, self.state_dim
        float_counts = [n * d] + ([n * s] if with_state else [])
        (keys,), floats = self._unpack(buf, stage, FrameKind.ANSWER, src, (n, int(with_state), 0), [n],
                                       float_counts, who)
        state = floats[1].reshape(n, s) if with_state else None
        return Answer(keys, floats[0].reshape(n, d), state)


# --- the trainer's side ----------------------------------------------------------------


@dataclass
class RowBlock:
    """Rows a trainer sends in one section of its stage frames: keys, values and (for
    write-backs and flushes) optimizer state, in the same order."""

    keys: np.ndarray
    values: torch.Tensor
    state: torch.Tensor | None = None

    @classmethod
    def empty(cls, row_dim: int, state_dim: int) -> "RowBlock":
        return cls(np.zeros(0, np.int64), torch.zeros((0, row_dim)), torch.zeros((0, state_dim)))

    def values_np(self) -> np.ndarray:
        return self.values.numpy()

    def state_np(self, state_dim: int) -> np.ndarray:
        if self.state is None or not state_dim:
            return np.zeros((len(self.keys), state_dim), np.float32)
        return self.state.numpy()



@dataclass
class PendingAnswers:
    """Posted receives of one stage's fetch answers, one per server."""

    stage: int
    keys: np.ndarray  # every fetched key, ascending
    with_state: bool
    requests: list  # (work, buffer, server index, positions in keys)

    @property
    def bytes(self) -> int:
        return sum(buf.numel() for _, buf, _, _ in self.requests)


class TrainerChannel:
    """Trainer k's stage traffic with every server, on the `data` group."""

    def __init__(self, layout: FrameLayout, placement: Placement, server_ranks: tuple[int, ...], group, trainer: int,
                 who: str, describe):
        self.layout, self.placement, self.server_ranks, self.group = layout, placement, server_ranks, group
        self.trainer, self.who, self.describe = trainer, who, describe
        self._pending_sends: list = []

    def send_stage(self, stage: int, fetch_keys: np.ndarray, grads: RowBlock | None = None,
                   writebacks: RowBlock | None = None, flushes: RowBlock | None = None) -> int:
        """One frame to every server (possibly empty). Returns bytes sent."""
        self.flush()  # the previous stage's buffers must be delivered before they go
        d, s = self.layout.row_dim, self.layout.state_dim
        grads, writebacks, flushes = (b if b is not None else RowBlock.empty(d, s) for b in (grads, writebacks, flushes))
        parts = [(b.keys, b.values_np(), b.state_np(s), self.placement.split(b.keys))
                 for b in (grads, writebacks, flushes)]
        f_pos = self.placement.split(fetch_keys)
        sent = 0
        for j, dst in enumerate(self.server_ranks):
            (gk, gv, _, gp), (wk, wv, ws, wp), (lk, lv, ls, lp) = parts
            msg = StageMessage(gk[gp[j]], gv[gp[j]], wk[wp[j]], wv[wp[j]], ws[wp[j]], lk[lp[j]], lv[lp[j]], ls[lp[j]],
                               fetch_keys[f_pos[j]])
            frame = self.layout.pack_stage(stage, self.trainer, msg)
            what = f"{self.who}: stage {stage} message to {self.describe(dst)}"
            self._pending_sends.append((posted(what, dist.isend, frame, dst, group=self.group), frame))
            sent += frame.numel()
        return sent

    def post_answers(self, stage: int, fetch_keys: np.ndarray, with_state: bool) -> PendingAnswers:
        requests = []
        for j, (src, pos) in enumerate(zip(self.server_ranks, self.placement.split(fetch_keys))):
            buf = torch.empty(self.layout.answer_bytes(len(pos), with_state), dtype=torch.uint8)
            what = f"{self.who}: stage {stage} rows from {self.describe(src)}"
            requests.append((posted(what, dist.irecv, buf, src, group=self.group), buf, j, pos))
        return PendingAnswers(stage, fetch_keys, with_state, requests)

    def wait_answers(self, pending: PendingAnswers) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Values (and state) of the fetched keys, in the order of `pending.keys`."""
        n, d, s = len(pending.keys), self.layout.row_dim, self.layout.state_dim
        values = torch.empty((n, d), dtype=torch.float32)
        state = torch.empty((n, s), dtype=torch.float32) if pending.with_state else None
        for work, buf, j, pos in pending.requests:
            who = f"{self.who}: stage {pending.stage} rows from {self.describe(self.server_ranks[j])}"
            wait(work, who)
            answer = self.layout.unpack_answer(buf, pending.stage, j, len(pos), pending.with_state, who)
            if not np.array_equal(answer.keys, pending.keys[pos]):
                raise PeerError(f"{who}: answered other rows than requested")
            index = torch.from_numpy(pos)
            values.index_copy_(0, index, torch.from_numpy(answer.values))
            if state is not None and s:
                state.index_copy_(0, index, torch.from_numpy(answer.state))
        return values, state

    def flush(self) -> None:
        for work, _ in self._pending_sends:
            wait(work, f"{self.who}: stage message delivery")
        self._pending_sends = []


# --- the server's side -------------------------------------------------------------------


class ServerChannel:
    """Server j's stage traffic with every trainer, on the `data` group."""

    def __init__(self, layout: FrameLayout, trainer_ranks: tuple[int, ...], group, server: int, who: str, describe):
        self.layout, self.trainer_ranks, self.group, self.server = layout, trainer_ranks, group, server
        self.who, self.describe = who, describe
        self._pending: list = []

    def receive_stage(self, stage: int, counts: list[tuple[int, int, int]]) -> tuple[list[StageMessage], int]:
        """Every trainer's frame of the stage (all receives posted first). Returns
        the messages in trainer-rank order and the bytes received."""
        recvs = []
        for k, src in enumerate(self.trainer_ranks):
            buf = torch.empty(self.layout.stage_bytes(counts[k]), dtype=torch.uint8)
            what = f"{self.who}: stage {stage} message from {self.describe(src)}"
            recvs.append((posted(what, dist.irecv, buf, src, group=self.group), buf))
        messages = []
        for k, (work, buf) in enumerate(recvs):
            who = f"{self.who}: stage {stage} message from {self.describe(self.trainer_ranks[k])}"
            wait(work, who)
            messages.append(self.layout.unpack_stage(buf, stage, k, counts[k], who))
        self.flush()  # the previous stage's answers (their trainers have posted receives by now)
        return messages, sum(buf.numel() for _, buf in recvs)

    def send_answer(self, stage: int, trainer: int, answer: Answer) -> int:
        frame = self.layout.pack_answer(stage, self.server, answer)
        dst = self.trainer_ranks[trainer]
        what = f"{self.who}: stage {stage} answer to {self.describe(dst)}"
        self._pending.append((posted(what, dist.isend, frame, dst, group=self.group), frame))
        return frame.numel()

    def flush(self) -> None:
        for work, _ in self._pending:
            wait(work, f"{self.who}: answer delivery")
        self._pending = []
