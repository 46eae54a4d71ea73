"""A stalled rank ends the job with a clue instead of hanging it.

The main thread calls `beat(step, phase)` as it enters each phase of a step; a daemon thread
checks that the last beat is younger than `parallel.timeout_minutes`. Both publish to the job's
store (the TCP store torchrun or `init_process_group` already runs): the main thread its progress
(a beat count, the step and the phase), the daemon thread a liveness time every few seconds. When
this rank has made no progress for the timeout, the watchdog

1. writes every thread's Python stack to `RUN_DIR/hang/rank_N.txt` (faulthandler),
2. reads every rank's record and names the culprits: ranks whose daemon thread stopped (a process
   stopped, dead or frozen) and, failing that, ranks behind the others,
3. kills the unresponsive ranks on this host (a stopped process ignores SIGTERM, so the launcher
   would otherwise wait for it), prints one line, records it for torchrun and exits.

Every healthy rank does the same, so a job ends within about one timeout of the stall.

Start-up (building or waiting for another rank to build the data's indexes, drawing the initial weights, reading
a checkpoint) may take longer than a step for good reason: there the watchdog is `patient`, and ends the job
when a rank has stopped answering (a frozen or dead process), not when one is merely slow, up to `PATIENCE`
timeouts (a wait nothing will end, such as a build lock a killed process left behind).
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

EXIT_CODE = 4  # the watchdog ended the job
PATIENCE = 6  # timeouts without progress at start-up while every rank still answers (an hour by default)
PREFIX = "megatronlite/watchdog"


def _connect_store(timeout_s: float) -> dist.Store | None:
    """A client of the job's TCP store of our own (its own timeout, usable from another thread)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not dist.is_initialized() or not addr or not port:
        return None
    try:
        store = dist.TCPStore(
            addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
        )
    except (RuntimeError, OSError, ValueError):
        return None
    return dist.PrefixStore(PREFIX, store)


def _store_address() -> str:
    return f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_s: float) -> None:
        self.run_dir, self.rank, self.world_size, self.timeout_s = run_dir, rank, world_size, timeout_s
        self.interval = max(0.5, min(5.0, timeout_s / 10))
        self.beats, self.step, self.phase = 0, 0, "start-up"
        self.patient = True  # until training starts: slowness is no stall, a stopped rank is
        self.last = time.monotonic()
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.store = _connect_store(max(2 * self.interval, 5.0))
        self.store_lost = False
        self.stop = threading.Event()
        # two threads: a store that stops answering may block the publisher, never the watch
        self.threads = [
            threading.Thread(target=self._watch, name="megatronlite-watchdog", daemon=True),
            threading.Thread(target=self._publish, name="megatronlite-heartbeat", daemon=True),
        ]

    def __enter__(self) -> Watchdog:
        self.beat(0, "start-up")
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.threads[0].join()

    def beat(self, step: int, phase: str) -> None:
        """The main thread has reached `phase` of `step`: progress."""
        self.beats, self.step, self.phase, self.last = self.beats + 1, step, phase, time.monotonic()
        record = {"beats": self.beats, "step": step, "phase": phase, "host": self.host, "pid": self.pid}
        self._set(f"progress/{self.rank}", json.dumps(record))

    def _set(self, key: str, value: str) -> None:
        if self.store is not None:
            try:
                self.store.set(key, value)
            except (RuntimeError, OSError):
                self.store, self.store_lost = None, True  # the report will say so; training goes on

    def _publish(self) -> None:
        """This process is alive (even while its main thread waits): what tells a stopped peer from a waiting one."""
        while True:
            self._set(f"alive/{self.rank}", repr(time.time()))
            if self.stop.wait(self.interval):
                return

    def _watch(self) -> None:
        while not self.stop.wait(self.interval):
            stalled_for = time.monotonic() - self.last
            if stalled_for <= self.timeout_s:
                continue
            # (the store is read only past the timeout: at start-up, whether every rank still answers)
            if not (self.patient and stalled_for < PATIENCE * self.timeout_s and self._all_answer()):
                self._fire(stalled_for)

    def _all_answer(self) -> bool:
        """Whether every other rank's process still publishes (or the store cannot tell: then wait on)."""
        try:
            return self.store is None or not self._unresponsive()
        except (RuntimeError, OSError):
            return True

    def _fire(self, stalled_for: float) -> None:
        where = f"step {self.step} ({self.phase}{_waiting_collective()})"
        stacks = self._dump_stacks(where, stalled_for)
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self._culprits()), daemon=True)
        reader.start()
        reader.join(timeout=2 * self.interval + 5)  # a store on a lost host may never answer
        if not found:
            self.store_lost = True
        culprits = found[0] if found else self._no_store()
        line = f"rank {self.rank}: no progress for {stalled_for:.0f} s in {where}; {culprits}; stacks in {stacks}"
        print(f"megatronlite: error: {line}", file=sys.stderr, flush=True)
        _record_for_torchrun(line)
        os._exit(EXIT_CODE)

    def _dump_stacks(self, where: str, stalled_for: float) -> Path:
        folder = self.run_dir / "hang"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank_{self.rank}.txt", "w") as f:
            f.write(f"rank {self.rank} (host {self.host}, pid {self.pid}): no progress for {stalled_for:.0f} s\n")
            f.write(f"waiting in {where}\n\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        return folder

    def _read(self, kind: str, rank: int) -> str | None:
        key = f"{kind}/{rank}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _culprits(self) -> str:
        """The ranks to blame: unresponsive ones first, else the ones behind in progress."""
        try:
            return self._blame() if self.store is not None else self._no_store()
        except (RuntimeError, OSError):
            self.store_lost = True
            return self._no_store()

    def _no_store(self) -> str:
        if self.store_lost:
            return f"the job's store at {_store_address()} (rank 0's host) stopped answering: that host is lost"
        return "the other ranks' state is unknown (no store)"

    def _unresponsive(self) -> list[int]:
        """The other ranks whose processes stopped publishing that they are alive."""
        now, dead_after = time.time(), 3 * self.interval + 2
        out = []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            alive = self._read("alive", r)
            if alive is None or now - float(alive) > dead_after:
                out.append(r)
        return out

    def _blame(self) -> str:
        records = {}
        for r in range(self.world_size):
            progress = self._read("progress", r)
            if progress is not None:
                records[r] = json.loads(progress)
        unresponsive = self._unresponsive()
        if unresponsive:
            self._kill_local(unresponsive, records)
            return "not responding: " + ", ".join(_describe(r, records.get(r)) for r in unresponsive)
        if records:
            least = min(rec["beats"] for rec in records.values())
            behind = [r for r, rec in records.items() if rec["beats"] == least]
            if len(behind) < len(records):
                return "behind the others: " + ", ".join(_describe(r, records[r]) for r in behind)
        return "every rank waits at the same point (a collective that never completes)"

    def _kill_local(self, ranks: list[int], records: dict) -> None:
        for r in ranks:
            rec = records.get(r)
            if rec and rec["host"] == self.host and rec["pid"] != self.pid:
                try:
                    os.kill(rec["pid"], signal.SIGKILL)
                except OSError:
                    pass


def _waiting_collective() -> str:
    """', in all_reduce' when the main thread waits in a torch.distributed call (its innermost such frame)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_filename.endswith("distributed_c10d.py"):
            return f", in {frame.f_code.co_name}"
        frame = frame.f_back
    return ""


def _describe(rank: int, record: dict | None) -> str:
    if record is None:
        return f"rank {rank} (never reported)"
    return f"rank {rank} (host {record['host']} pid {record['pid']}, last in step {record['step']} {record['phase']})"


def _record_for_torchrun(line: str) -> None:
    """torchrun reports a worker's error file; write ours so the launcher prints this line, not 'exit code 4'."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(RuntimeError(line))
