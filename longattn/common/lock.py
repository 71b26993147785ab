"""One job per run directory: the ranks of one job share it, a second job is refused naming the holder.

Every process of a run holds a slot, ``out_dir/.lock/rank-00003.json`` (its job, rank, world size, host, pid
and start time). A process may take its slot when every live slot belongs to its own job and no live
process holds the same rank. What makes two processes "one job":

- the launcher's job id, when there is one: a SLURM array (all elements of one array; they share
  ``out_dir`` only when they shard it through ``shard.rank``), a torchrun launch (run id and rendezvous
  address), a SLURM job (its srun tasks);
- for processes started by hand (no job id): the same world size, each with its own rank — so
  ``shard.rank=0`` and ``shard.rank=1`` started in two shells join, and a second single-process run on
  the same directory finds rank 0 taken.

A slot whose process is gone is taken over: on the same machine the pid is checked (with its start time,
against pid reuse); a slot of another machine counts as gone when its heartbeat (the file's mtime, touched
every ``HEARTBEAT_S``) is older than ``STALE_S``, and at once when the same job takes the same rank again (a
requeued SLURM job on a new node). Deciding and writing happen under an ``flock`` on ``.lock/guard``, so two
processes never both take over one stale slot.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from longattn.common.io import write_json

log = logging.getLogger(__name__)

__all__ = ["OutDirLock", "OutDirLocked", "job_key", "HEARTBEAT_S", "STALE_S"]

HEARTBEAT_S = 60.0
"""How often a holder touches its slot file."""
STALE_S = 600.0
"""A slot of another machine not touched for this long belongs to a process that is gone."""


class OutDirLocked(RuntimeError):
    """The run directory is in use by another job; the message names the holder."""


def job_key(env: dict[str, str] | None = None) -> str | None:
    """What identifies this process's job, so that its ranks share one lock; None when started by hand."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-array-{env['SLURM_ARRAY_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    return None


def _machine() -> str:
    """This kernel and pid namespace: where a pid means the same process."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "/".join(parts)


@dataclass
class Holder:
    """The process in one slot."""

    rank: int
    world: int
    job: str | None
    host: str
    machine: str
    pid: int
    create_time: float
    started: str

    @classmethod
    def me(cls, rank: int, world: int, job: str | None) -> Holder:
        return cls(rank, world, job, socket.gethostname(), _machine(), os.getpid(),
                   psutil.Process().create_time(), datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"pid {self.pid} on host {self.host} (rank {self.rank} of {self.world}{job}), started {self.started}"

    def alive(self, slot: Path) -> bool:
        if self.machine != _machine():
            try:
                return time.time() - slot.stat().st_mtime < STALE_S
            except FileNotFoundError:
                return False
        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.create_time) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


class OutDirLock:
    """Hold a slot in ``out_dir/.lock`` for the life of a ``with`` block (see the module docstring)."""

    def __init__(self, out_dir: str | Path, rank: int = 0, world: int = 1, job: str | None = None):
        self.dir = Path(out_dir) / ".lock"
        self.me = Holder.me(rank, world, job if job is not None else job_key())
        self.slot = self.dir / f"rank-{rank:05d}.json"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> OutDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._guard():
            for slot, other in self._holders():
                if not other.alive(slot):
                    log.warning("taking over the lock of a process that is gone: %s", other.describe())
                    slot.unlink(missing_ok=True)
                elif why := self._conflict(other):
                    raise OutDirLocked(
                        f"out_dir={self.dir.parent} is in use by another job ({why}): {other.describe()}. Wait for "
                        f"it to finish or use another out_dir; if that process is gone (its node died), delete {slot}")
                elif other.rank == self.me.rank:
                    log.warning("taking over rank %d from an earlier run of this job: %s", other.rank, other.describe())
            write_json(self.slot, asdict(self.me))
        self._beat = threading.Thread(target=self._heartbeat, name="out_dir-lock-heartbeat", daemon=True)
        self._beat.start()

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        with self._guard():
            held = self._read(self.slot)
            if held is not None and (held.pid, held.machine) == (self.me.pid, self.me.machine):
                self.slot.unlink(missing_ok=True)

    def _conflict(self, other: Holder) -> str | None:
        """Why a live holder belongs to another job, or None when it is a fellow rank of this one."""
        me = self.me
        if other.job != me.job:
            return "another job id" if other.job and me.job else "a process of another launch"
        if other.world != me.world:
            return f"world size {other.world}, this process {me.world}"
        if other.rank == me.rank and (me.job is None or other.machine == me.machine):
            return f"rank {me.rank} is already running"
        return None

    def _holders(self) -> Iterator[tuple[Path, Holder]]:
        for slot in sorted(self.dir.glob("rank-*.json")):
            held = self._read(slot)
            if held is not None:
                yield slot, held

    @staticmethod
    def _read(slot: Path) -> Holder | None:
        try:
            return Holder(**json.loads(slot.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """An exclusive flock on ``.lock/guard`` (released by the kernel if this process dies)."""
        with open(self.dir / "guard", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as e:  # some network file systems lack flock: go on unguarded, saying so
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                log.warning("cannot flock %s (%s): the out_dir lock is not race-free here", f.name, e)
            yield

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.slot)
