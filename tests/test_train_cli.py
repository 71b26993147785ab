"""End to end: `python -m train` (longattn-train) on CPU from a real longattn-select run: train, checkpoint,
resume identically, export a HF model; world size 2 (data parallel, tensor parallel) with torchrun and gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, needs_smollm2

pytest.importorskip("megatron.core")

# tiny_llama (SmolLM2 tokenizer, vocab 49152), 64-token sequences, 4 sequences per step.
TINY = ["model=tiny_llama", "train.seq_length=64", "train.micro_batch_size=1", "train.bf16=false",
        "schedule.lr=3e-3", "schedule.warmup_fraction=0", "data.workers=0", "train.save_every=2"]


def run_train(out_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    keys = {o.split("=")[0] for o in overrides}
    base = [o for o in TINY if o.split("=")[0] not in keys]  # a key given twice would be ambiguous
    cmd = [sys.executable, "-m", "longattn.cli.train", f"out_dir={out_dir}", *base, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> Path:
    """A real longattn-select out_dir (tiny random scorer, 40 windows of 256 tokens per category)."""
    out = tmp_path_factory.mktemp("select")
    cmd = [sys.executable, "-m", "longattn.cli.select", "data.paths=[data/sample_corpus.jsonl.gz]",
           "window.length=256", "window.sample_size=40", "model=tiny_llama", f"out_dir={out}",
           "report.enabled=false"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


@needs_smollm2
def test_train_checkpoint_resume_export(selected, tmp_path):
    # Interrupted after 2 of 4 steps, then rerun with the same out_dir: it resumes from the checkpoint.
    resumed = tmp_path / "resumed"
    common = [f"data.selected={selected}", "train.steps=4", "train.grad_accum=4", "train.dropout=0.1"]
    run_train(resumed, *common, "train.max_steps_this_run=2")
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (resumed / "hf").exists()
    proc = run_train(resumed, *common)
    assert "resumed from" in proc.stderr + proc.stdout
    # The same run in one go, in this process (also checks the API entry point).
    from longattn.cli.train import to_schema
    from train.loop import run_train as run_in_process

    once = tmp_path / "once"
    cfg = _compose(f"out_dir={once}", *TINY, *common)
    assert run_in_process(to_schema(cfg)) == {"step": 4, "tokens": 4 * 4 * 64}
    a, b = losses(resumed), losses(once)
    assert sorted(a) == [1, 2, 3, 4]
    # Same data order, optimizer state, LR schedule and dropout RNG: bit-identical losses after resume.
    assert a == b
    row = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(row)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resumed / "hf")
    model = AutoModelForCausalLM.from_pretrained(resumed / "hf", dtype=torch.float32)
    assert model.config.rope_parameters["rope_theta"] == 10000.0 and not model.config.tie_word_embeddings
    ids = tok("def main():\n    return 0", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()  # another test may have left Hydra initialised
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@needs_smollm2
def test_world_size_2_data_and_tensor_parallel_agree(selected, corpus, tmp_path):
    # Both read the same 4 sequences per step (DP: 2 ranks x 2 micro-batches; TP: 4 micro-batches on one
    # data-parallel rank), so with dropout off their loss curves agree up to reduction order.
    common = [f"data.selected={selected}", f"data.short.wiki={corpus}", "train.steps=3", "train.dropout=0",
              "launcher.nproc_per_node=2"]
    # One tokenised copy of the data: built by the DP run (2 tokeniser processes), reused by the TP run.
    data = [f"data.cache_dir={tmp_path / 'data'}"]
    run_train(tmp_path / "dp2", *common, *data, "train.grad_accum=2", "parallel.tensor=1", "data.workers=2")
    proc = run_train(tmp_path / "tp2", *common, *data, "train.grad_accum=4", "parallel.tensor=2")
    assert "data: wiki ->" not in proc.stderr + proc.stdout  # skipped: already built
    dp, tp = losses(tmp_path / "dp2"), losses(tmp_path / "tp2")
    assert sorted(dp) == sorted(tp) == [1, 2, 3]
    assert all(abs(dp[s] - tp[s]) < 1e-4 for s in dp), (dp, tp)
    assert dp[3] < dp[1]
    for run in ("dp2", "tp2"):
        assert (tmp_path / run / "hf" / "model.safetensors").is_file()
    built = {p.name.split(".")[0] for p in (tmp_path / "data").glob("*.done.json")}
    assert built == {"arxiv", "book", "code", "wiki"}  # the selected categories and the short source
