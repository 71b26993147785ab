"""The selection stage logs to W&B offline: the run's records hold the metrics.json numbers, the score
histograms and the selected set, in the configured group with job type ``select``."""

import json

import pytest
from test_select_cli import run_select
from wandb_records import records, summary

wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")


def test_select_logs_offline(tmp_path, tokenizer_dir, corpus, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_select(out, f"data.paths=[{corpus}]", "model=tiny_llama", f"model.tokenizer={tokenizer_dir}",
               "wandb.enabled=true", "wandb.group=test_group")
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = summary(records(run_file))
    metrics = json.loads((out / "metrics.json").read_text())
    assert logged["group"] == "test_group" and logged["job_type"] == "select"
    assert logged["artifacts"] == [("selected-longattn-tiny_llama", "dataset")]
    h = logged["history"]
    assert h["select/windows"] == metrics["windows"] and h["select/kept"] == metrics["counts"]["kept"]
    for cat, c in metrics["categories"].items():
        assert h[f"select/{cat}/kept"] == c["kept"] and h[f"select/{cat}/mean_ds"] == pytest.approx(c["mean_ds"])
        assert h[f"select/{cat}/lds/_type"] == "histogram"  # score distributions, not only scalars
        assert sum(h[f"select/{cat}/lds/values"]) == c["windows_in"]
    assert logged["summary"]["select/kept"] == metrics["counts"]["kept"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("select/kept") == metrics["counts"]["kept"] for r in rows)
