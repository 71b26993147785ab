"""Scoring as a SLURM job array through Hydra's submitit launcher, on a real one-node SLURM cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT
from slurm_cluster import missing_reason, slurm_cluster
from test_select_cli import OUTS, W, outputs, run_select

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def test_sbatch_runs(cluster, tmp_path):
    out = tmp_path / "hello.txt"
    env = {**os.environ, **cluster}
    proc = subprocess.run(["sbatch", "--wait", "-o", str(out), "--wrap", "hostname"], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_text().strip()


def test_hydra_slurm_array_equals_local_run(cluster, tmp_path, tokenizer_dir, corpus):
    tiny = ["model=tiny_llama", f"model.tokenizer={tokenizer_dir}"]
    ref = tmp_path / "local"
    run_select(ref, f"data.paths=[{corpus}]", *tiny, "shard.windows=3")
    out = tmp_path / "slurm"
    cmd = [sys.executable, "-m", "longattn.cli.select", "-m", "hydra/launcher=slurm",
           "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=20",
           f"out_dir={out}", f"window.length={W}", "window.workers=1", "report.top_k=3",
           f"data.paths=[{corpus}]", *tiny, "shard.windows=3", "shard.world_size=2", "shard.rank=0,1",
           "shard.merge=never"]
    env = {**os.environ, **cluster}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p.name for p in (out / ".hydra_multirun" / ".submitit").rglob("*_log.out"))
    assert len(jobs) == 2 and all("_" in j for j in jobs), jobs  # array elements <job>_0 and <job>_1
    assert len(list((out / "shards").glob("rank-*.json"))) == 2
    run_select(out, f"data.paths=[{corpus}]", *tiny, "shard.windows=3", "shard.merge=only")
    assert outputs(out) == outputs(ref)
    assert set(OUTS) <= {p.name for p in out.iterdir()}
