"""Launchers: how ``longattn-train`` gets its processes. Chosen by ``launcher.name`` (a registry, no if-chain).

- ``local``: this process; with ``launcher.nproc_per_node`` > 1 it re-executes itself under torchrun.
- ``slurm``: writes ``out_dir/launch.sbatch`` (one ``srun`` task per node, each a torchrun with
  ``nproc_per_node`` workers and a c10d rendezvous on the first node; whole nodes with their CPUs and
  memory) and submits it when ``launcher.submit``. With ``train.prepare_only=true`` it writes
  ``out_dir/prepare.sbatch`` instead: a CPU array of ``data.prepare.world_size`` elements, no GPU. Submitting a
  training job whose data is not prepared submits the preparation array first and makes the training job
  depend on it, so GPU nodes never tokenise.
  An sbatch script fits multi-node torchrun better than Hydra's submitit launcher, which starts one
  Python process per task and leaves the rendezvous to the user.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from train.config import LauncherConfig, TrainRunConfig, launch_world_size

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def torchrun_command(lc: LauncherConfig, overrides: list[str], *, nnodes: str = "1",
                     rendezvous: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc-per-node={lc.nproc_per_node}"]
    if rendezvous:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous}", "--rdzv-id=$SLURM_JOB_ID"]
    else:  # one node: torchrun picks a free port, so concurrent local runs do not collide
        cmd += ["--standalone"]
    return cmd + ["-m", "longattn.cli.train", *overrides]


def launch_local(cfg: TrainRunConfig, overrides: list[str]) -> bool:
    """True when the work was handed to torchrun (this process then only waits for it)."""
    if cfg.launcher.nproc_per_node <= 1 or under_torchrun() or cfg.train.prepare_only:
        return False
    cmd = torchrun_command(cfg.launcher, overrides)
    log.info("launching: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)
    return True


def _header(cfg: TrainRunConfig, name: str, *, nodes: int, gpus: int, cpus: int | None, mem: str | None,
            exclusive: bool, time: str) -> list[str]:
    lc = cfg.launcher
    out = Path(cfg.out_dir).resolve()
    lines = [f"#SBATCH --job-name={name}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --time={time}", f"#SBATCH --output={out}/slurm-%j.out"]
    lines += [f"#SBATCH --gpus-per-node={gpus}"] if gpus else []
    lines += [f"#SBATCH --cpus-per-task={cpus}"] if cpus else []
    lines += [f"#SBATCH --mem={mem}"] if mem is not None else []
    lines += ["#SBATCH --exclusive"] if exclusive else []
    lines += [f"#SBATCH --partition={lc.partition}"] if lc.partition else []
    lines += [f"#SBATCH --account={lc.account}"] if lc.account else []
    return lines


def _body(cfg: TrainRunConfig, cmd: str) -> list[str]:
    env = [f"export {k}={shlex.quote(str(v))}" for k, v in cfg.launcher.env.items()]
    return ["set -euo pipefail", *env, f"cd {shlex.quote(str(Path.cwd()))}", cmd, ""]


def _inner(overrides: list[str], *extra: str) -> list[str]:
    drop = {e.split("=")[0] for e in extra} | {"launcher.name"}
    return [o for o in overrides if o.split("=")[0].lstrip("+") not in drop] + list(extra)


def sbatch_script(cfg: TrainRunConfig, overrides: list[str]) -> str:
    """The training job: whole GPU nodes, one torchrun per node."""
    lc = cfg.launcher
    gpus = lc.nproc_per_node if lc.gpus_per_node is None else lc.gpus_per_node
    header = _header(cfg, "longattn-train", nodes=lc.nodes, gpus=gpus, cpus=lc.cpus_per_task, mem=lc.mem,
                     exclusive=lc.exclusive, time=lc.time)
    cmd = torchrun_command(lc, _inner(overrides, "launcher.name=local"), nnodes="$SLURM_NNODES",
                           rendezvous="$MASTER_ADDR:" + str(lc.master_port))
    # $SLURM_* must expand on each node: the command is not quoted as a whole.
    srun = "srun " + " ".join(a if a.startswith(("--nnodes", "--rdzv")) else shlex.quote(a) for a in cmd)
    return "\n".join(["#!/bin/bash", *header, "set -euo pipefail",
                      'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                      *_body(cfg, srun)[1:]])


def prepare_script(cfg: TrainRunConfig, overrides: list[str]) -> str:
    """The data preparation: a CPU array, element i = data.prepare.rank i (the last to finish merges)."""
    lc, world = cfg.launcher, cfg.data.prepare.world_size
    header = _header(cfg, "longattn-prepare", nodes=1, gpus=0, cpus=lc.cpus_per_task, mem=lc.mem,
                     exclusive=False, time=lc.time) + [f"#SBATCH --array=0-{world - 1}"]
    extra = ["launcher.name=local", "train.prepare_only=true", f"data.prepare.world_size={world}",
             "data.prepare.rank=$SLURM_ARRAY_TASK_ID"]
    if not any(o.split("=")[0] == "data.workers" for o in overrides):
        extra.append("data.workers=$SLURM_CPUS_PER_TASK")  # one tokeniser per allocated core
    cmd = [sys.executable, "-m", "longattn.cli.train", *_inner(overrides, *extra)]
    line = " ".join(a if "$SLURM_" in a else shlex.quote(a) for a in cmd)
    return "\n".join(["#!/bin/bash", *header, *_body(cfg, line)])


def _sbatch(path: Path, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args, str(path)], check=True, capture_output=True,
                         text=True).stdout
    return out.strip().split(";")[0]


def launch_slurm(cfg: TrainRunConfig, overrides: list[str]) -> bool:
    from train.prepare import missing_work

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prep = out / "prepare.sbatch"
    prep.write_text(prepare_script(cfg, overrides))
    if cfg.train.prepare_only:
        if cfg.launcher.submit:
            log.info("submitted data preparation %s: job %s", prep, _sbatch(prep))
        else:
            log.info("wrote %s; submit with: sbatch %s", prep, prep)
        return True
    path = out / "launch.sbatch"
    path.write_text(sbatch_script(cfg, overrides))
    missing = missing_work(cfg, launch_world_size(cfg))
    if missing:
        log.warning("data is not prepared (%s): the training job must wait for %s", missing, prep)
    if not cfg.launcher.submit:
        dep = f"--dependency=afterok:$(sbatch --parsable {prep}) " if missing else ""
        log.info("wrote %s; submit with: sbatch %s%s", path, dep, path)
        return True
    dep = []
    if missing:
        job = _sbatch(prep)
        log.info("submitted data preparation %s: job %s", prep, job)
        dep = [f"--dependency=afterok:{job}"]
    log.info("submitted %s: job %s", path, _sbatch(path, *dep))
    return True


LAUNCHERS: dict[str, Callable[[TrainRunConfig, list[str]], bool]] = {"local": launch_local, "slurm": launch_slurm}
