"""Launchers: how ``longattn-train`` gets its processes. Chosen by ``launcher.name`` (a registry, no if-chain).

- ``local``: this process; with ``launcher.nproc_per_node`` > 1 it re-executes itself under torchrun.
- ``slurm``: writes ``out_dir/launch.sbatch`` (one ``srun`` task per node, each a torchrun with
  ``nproc_per_node`` workers and a c10d rendezvous on the first node) and submits it when ``launcher.submit``.
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

from train.config import LauncherConfig, TrainRunConfig

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
    if cfg.launcher.nproc_per_node <= 1 or under_torchrun():
        return False
    cmd = torchrun_command(cfg.launcher, overrides)
    log.info("launching: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True)
    return True


def sbatch_script(cfg: TrainRunConfig, overrides: list[str]) -> str:
    lc = cfg.launcher
    gpus = lc.nproc_per_node if lc.gpus_per_node is None else lc.gpus_per_node
    header = ["#SBATCH --job-name=longattn-train", f"#SBATCH --nodes={lc.nodes}", "#SBATCH --ntasks-per-node=1",
              f"#SBATCH --time={lc.time}", f"#SBATCH --output={Path(cfg.out_dir).resolve()}/slurm-%j.out"]
    header += [f"#SBATCH --gpus-per-node={gpus}"] if gpus else []
    header += [f"#SBATCH --partition={lc.partition}"] if lc.partition else []
    header += [f"#SBATCH --account={lc.account}"] if lc.account else []
    inner = [o for o in overrides if not o.startswith("launcher.name=")] + ["launcher.name=local"]
    cmd = torchrun_command(lc, inner, nnodes="$SLURM_NNODES", rendezvous="$MASTER_ADDR:" + str(lc.master_port))
    env = [f"export {k}={shlex.quote(str(v))}" for k, v in lc.env.items()]
    return "\n".join(["#!/bin/bash", *header, "set -euo pipefail",
                      'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)', *env,
                      f"cd {shlex.quote(str(Path.cwd()))}",
                      # $SLURM_* must expand on each node: the command is not quoted as a whole.
                      "srun " + " ".join(a if a.startswith(("--nnodes", "--rdzv")) else shlex.quote(a) for a in cmd),
                      ""])


def launch_slurm(cfg: TrainRunConfig, overrides: list[str]) -> bool:
    path = Path(cfg.out_dir) / "launch.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sbatch_script(cfg, overrides))
    if cfg.launcher.submit:
        out = subprocess.run(["sbatch", str(path)], check=True, capture_output=True, text=True).stdout
        log.info("submitted %s: %s", path, out.strip())
    else:
        log.info("wrote %s; submit with: sbatch %s", path, path)
    return True


LAUNCHERS: dict[str, Callable[[TrainRunConfig, list[str]], bool]] = {"local": launch_local, "slurm": launch_slurm}
