"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd on 127.0.0.1.

Needs root and Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them). Everything the cluster
writes lives in a temporary folder; the daemons are stopped when the fixture ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")


def missing_reason() -> str | None:
    """Why no cluster can start here (None if it can)."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    for b in BINARIES:
        if shutil.which(b) is None and not Path("/usr/sbin", b).exists():
            return f"{b} not found: apt-get install slurm-wlm munge (.ci/run does it)"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key missing (reinstall munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, host: str, cpus: int) -> str:
    # Fresh ports per cluster: a previous test's daemons may still be releasing the default ones.
    return f"""ClusterName=longattn-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@contextmanager
def slurm_cluster(root: Path, cpus: int = 2, timeout: float = 60.0) -> Iterator[dict[str, str]]:
    """Start the cluster; yield the environment (SLURM_CONF) its clients need."""
    host = socket.gethostname()
    for d in ("state", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, host, cpus))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    procs = []
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True)
    try:
        for daemon in ("slurmctld", "slurmd"):
            log = open(root / f"{daemon}.out", "w")
            procs.append(subprocess.Popen([_sbin(daemon), "-D", "-f", str(conf)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        _wait_idle(env, host, timeout, root)
        _wait_accepts_jobs(env, timeout, root)
        yield {"SLURM_CONF": str(conf)}
    finally:
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_accepts_jobs(env: dict[str, str], timeout: float, root: Path) -> None:
    """A node can report idle before the controller schedules: submit a trivial job until one runs."""
    deadline = time.monotonic() + timeout
    err = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["sbatch", "--wait", "-o", "/dev/null", "--wrap", "true"], env=env,
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode == 0:
            return
        err = out.stderr
        time.sleep(1.0)
    raise RuntimeError(f"SLURM accepts no job after {timeout} s: {err}\n{(root / 'slurmctld.log').read_text()[-2000:]}")


def _wait_idle(env: dict[str, str], host: str, timeout: float, root: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["sinfo", "-h", "-n", host, "-o", "%T"], env=env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().rstrip("*") in ("idle", "mixed"):
            return
        time.sleep(0.5)
    logs = "\n".join((root / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log") if (root / f).exists())
    raise RuntimeError(f"SLURM node {host} not idle after {timeout} s:\n{logs}")
