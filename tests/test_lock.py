"""The out_dir lock: ranks of one job share it, a second job is refused naming the holder, the dead are replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import psutil
import pytest

from longattn.common.lock import OutDirLock, OutDirLocked, job_key


@pytest.fixture()
def other_process():
    """A live process that is not this one (its pid and start time stand for another job's rank)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def plant(out_dir, rank, world, job, pid, *, machine=None, age=0.0):
    """A slot file as another process would have written it."""
    lock = OutDirLock(out_dir, rank, world, job="x")
    h = lock.me
    h.pid, h.job, h.world = pid, job, world
    h.create_time = psutil.Process(pid).create_time() if psutil.pid_exists(pid) else 1.0
    if machine:
        h.machine, h.host = machine, "node-7"
    lock.dir.mkdir(parents=True, exist_ok=True)
    lock.slot.write_text(json.dumps(asdict(h)))
    if age:
        os.utime(lock.slot, (time.time() - age, time.time() - age))
    return lock.slot


def test_second_job_is_refused_naming_the_holder(tmp_path, other_process):
    plant(tmp_path, 0, 1, None, other_process.pid)
    with pytest.raises(OutDirLocked) as e, OutDirLock(tmp_path, 0, 1, job=None):
        pass
    msg = str(e.value)
    assert f"pid {other_process.pid}" in msg and "on host" in msg and "started 20" in msg and "rank 0 of 1" in msg


def test_another_job_on_other_ranks_is_refused_too(tmp_path, other_process):
    plant(tmp_path, 3, 4, "slurm-array-11", other_process.pid)
    for job, world in (("slurm-array-12", 4), (None, 4), ("slurm-array-11", 2)):
        with pytest.raises(OutDirLocked), OutDirLock(tmp_path, 0, world, job=job):
            pass


def test_ranks_of_one_job_share_the_directory(tmp_path, other_process):
    plant(tmp_path, 1, 2, "torchrun-a@h:1", other_process.pid)
    with OutDirLock(tmp_path, 0, 2, job="torchrun-a@h:1") as lock:
        assert lock.slot.exists()
    assert not lock.slot.exists()  # released
    # ranks started by hand (no job id) join when they agree on the world size
    plant(tmp_path, 1, 2, None, other_process.pid)
    with OutDirLock(tmp_path, 0, 2, job=None):
        pass


def test_same_rank_twice_is_refused(tmp_path, other_process):
    plant(tmp_path, 1, 2, None, other_process.pid)
    with pytest.raises(OutDirLocked, match="rank 1 is already running"), OutDirLock(tmp_path, 1, 2, job=None):
        pass


def test_stale_locks_are_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(tmp_path, 0, 1, None, dead.pid)  # same machine, process gone
    plant(tmp_path, 1, 2, "slurm-9", 4242, machine="elsewhere", age=3600)  # another machine, no heartbeat for 1 h
    with OutDirLock(tmp_path, 0, 1, job=None) as lock:
        assert json.loads(lock.slot.read_text())["pid"] == os.getpid()
        assert not (tmp_path / ".lock" / "rank-00001.json").exists()
    assert caplog.text.count("taking over the lock of a process that is gone") == 2


def test_live_holder_on_another_machine_is_respected_unless_its_own_job_requeued(tmp_path):
    plant(tmp_path, 0, 1, "slurm-5", 4242, machine="elsewhere", age=5)
    with pytest.raises(OutDirLocked, match="node-7"), OutDirLock(tmp_path, 0, 1, job="slurm-6"):
        pass
    # the same job on the same rank again: a requeued job on a new node replaces its earlier self
    with OutDirLock(tmp_path, 0, 1, job="slurm-5") as lock:
        assert json.loads(lock.slot.read_text())["pid"] == os.getpid()


def test_pid_reuse_is_not_mistaken_for_the_holder(tmp_path, other_process):
    slot = plant(tmp_path, 0, 1, None, other_process.pid)
    held = json.loads(slot.read_text())
    held["create_time"] -= 1000  # the recorded process started long before this pid's current owner
    slot.write_text(json.dumps(held))
    with OutDirLock(tmp_path, 0, 1, job=None):
        pass


def test_concurrent_takeover_lets_exactly_one_in(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    plant(tmp_path / "run", 0, 1, None, dead.pid)
    # Each process imports, then waits for the others (a file barrier), so all four race for the one slot.
    script = ("import sys, time, pathlib, os; from longattn.common.lock import OutDirLock, OutDirLocked\n"
              "bar = pathlib.Path(sys.argv[2]); (bar / str(os.getpid())).touch()\n"
              "while len(list(bar.iterdir())) < 4: time.sleep(0.01)\n"
              "try:\n    l = OutDirLock(sys.argv[1], 0, 1, job=None); l.acquire(); print('got', flush=True); "
              "time.sleep(2); l.release()\nexcept OutDirLocked:\n    print('refused', flush=True)\n")
    (tmp_path / "barrier").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "TORCHELASTIC_RUN_ID")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "barrier")],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["got", "refused", "refused", "refused"]


def test_heartbeat_keeps_a_long_run_fresh(tmp_path, monkeypatch):
    import longattn.common.lock as lock_mod

    monkeypatch.setattr(lock_mod, "HEARTBEAT_S", 0.05)
    with OutDirLock(tmp_path, 0, 1, job=None) as lock:
        os.utime(lock.slot, (1, 1))
        deadline = time.time() + 5
        while lock.slot.stat().st_mtime < 100 and time.time() < deadline:
            time.sleep(0.05)
        assert lock.slot.stat().st_mtime > 100
    assert not any(t.name == "out_dir-lock-heartbeat" for t in threading.enumerate())


def test_job_key_from_launchers():
    assert job_key({"SLURM_ARRAY_JOB_ID": "7", "SLURM_JOB_ID": "9"}) == "slurm-array-7"
    assert job_key({"TORCHELASTIC_RUN_ID": "r", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}) == "torchrun-r@n1:29500"
    assert job_key({"SLURM_JOB_ID": "9"}) == "slurm-9"
    assert job_key({}) is None
