"""Scoring completions in parallel, each call bounded in time.

`workers` processes (spawned: the driver has Ray's threads, which a fork would copy half-way) each load the
reward function once and then score one completion per request. A call still running `timeout_s` after it
started is killed with its process (math-verify's SIGALRM cannot interrupt everything, e.g. one long C call
in sympy) and scores 0; a new process takes the place of the killed one. An exception in the function, or a
value that is not a finite number, raises `RewardFnError` naming the row.

workers=0 scores in the calling thread, with no bound (for debugging a reward function).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from colocate.rewards.spec import load_reward

log = logging.getLogger(__name__)


class RewardFnError(RuntimeError):
    """The reward function failed on one row: `row_index` (the row's index in its file), `remote_traceback`."""

    def __init__(self, message: str, *, row_index: int, remote_traceback: str = "") -> None:
        super().__init__(message + (f"\n{remote_traceback}" if remote_traceback else ""))
        self.row_index = row_index
        self.remote_traceback = remote_traceback


@dataclass(frozen=True)
class Item:
    """One call: the completion, the gold answer, the row and the row's index (for errors)."""

    completion: str
    answer: str
    row: dict[str, Any]
    row_index: int


def _value(out: Any, spec: str, row_index: int) -> float:
    if isinstance(out, bool) or not isinstance(out, int | float) or not math.isfinite(out):
        raise RewardFnError(f"reward.fn {spec} returned {out!r} for row {row_index}: not a finite number",
                            row_index=row_index)
    return float(out)


def _serve(spec: str, conn: Connection) -> None:
    """A worker process: load the function, then answer (index, item) requests until None."""
    fn = load_reward(spec)
    while (request := conn.recv()) is not None:
        index, item = request
        try:
            conn.send((index, "ok", fn(item.completion, item.answer, item.row)))
        except Exception as e:
            conn.send((index, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))


class _Worker:
    def __init__(self, ctx: Any, spec: str) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(spec, child), daemon=True, name="colocate-reward")
        self.proc.start()
        child.close()
        self.index: int | None = None
        """The item it is scoring (None: idle), since `started`."""
        self.started = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardPool:
    def __init__(self, spec: str, *, workers: int, timeout_s: float) -> None:
        self.spec, self.n_workers, self.timeout_s = spec, workers, timeout_s
        self._inline = load_reward(spec) if workers == 0 else None
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self.timeouts = 0
        """Calls killed at `timeout_s` so far (each scored 0)."""

    def score(self, items: Sequence[Item]) -> list[float]:
        if self._inline is not None:
            return [self._call_inline(item) for item in items]
        while len(self._workers) < self.n_workers:  # started at the first call, kept for the run
            self._workers.append(_Worker(self._ctx, self.spec))
        out = [0.0] * len(items)
        todo = deque(range(len(items)))
        while todo or any(w.index is not None for w in self._workers):
            for w in self._workers:
                if w.index is None and todo:
                    w.index, w.started = todo.popleft(), time.monotonic()
                    w.conn.send((w.index, items[w.index]))
            busy = [w for w in self._workers if w.index is not None]
            first_deadline = min(w.started for w in busy) + self.timeout_s
            ready = wait([w.conn for w in busy], timeout=max(0.0, first_deadline - time.monotonic()))
            for w in busy:
                row_index = items[w.index].row_index
                if w.conn in ready:
                    out[w.index] = self._receive(w, row_index)
                elif time.monotonic() - w.started >= self.timeout_s:
                    self._replace(w, row_index)  # its item keeps the 0.0 it was given
                else:
                    continue
                w.index = None
        return out

    def _call_inline(self, item: Item) -> float:
        assert self._inline is not None
        try:
            out = self._inline(item.completion, item.answer, item.row)
        except Exception as e:
            raise RewardFnError(f"reward.fn {self.spec} failed on row {item.row_index}: {type(e).__name__}: {e}",
                                row_index=item.row_index, remote_traceback=traceback.format_exc()) from e
        return _value(out, self.spec, item.row_index)

    def _receive(self, w: _Worker, row_index: int) -> float:
        try:
            reply = w.conn.recv()
        except EOFError:
            w.proc.join(timeout=5)
            self.close()
            raise RewardFnError(f"reward.fn {self.spec}: its process died (exit code {w.proc.exitcode}) scoring "
                                f"row {row_index}", row_index=row_index) from None
        if reply[1] == "error":
            self.close()
            raise RewardFnError(f"reward.fn {self.spec} failed on row {row_index}: {reply[2]}",
                                row_index=row_index, remote_traceback=reply[3])
        return _value(reply[2], self.spec, row_index)

    def _replace(self, w: _Worker, row_index: int) -> None:
        """Kill an overrunning call's process and start another in its place."""
        self.timeouts += 1
        log.warning("reward.fn %s: row %d took over %.1f s; killed, scored 0", self.spec, row_index, self.timeout_s)
        w.kill()
        fresh = _Worker(self._ctx, self.spec)
        w.conn, w.proc = fresh.conn, fresh.proc

    def close(self) -> None:
        for w in self._workers:
            if w.proc.is_alive():
                with contextlib.suppress(OSError):
                    w.conn.send(None)
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.kill()
        self._workers = []
