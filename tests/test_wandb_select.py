"""The selection stage logs to W&B offline: a run directory with its summary and the selected set."""

import json

import pytest
from test_select_cli import run_select

wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")


def test_select_logs_offline(tmp_path, tokenizer_dir, corpus, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_select(out, f"data.paths=[{corpus}]", "model=tiny_llama", f"model.tokenizer={tokenizer_dir}",
               "wandb.enabled=true", "wandb.group=test_group")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["select/windows"] > 0 and "select/book/kept" in rows[-1]
