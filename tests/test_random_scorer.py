"""Random baseline (pure choice) and both baselines through the shared selection CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from longattn.selection.lds import lds_scores, rank
from longattn.selection.scorers.random_scorer import budgeted_random_choice, window_uniform


def test_window_uniform_is_seeded_and_order_free():
    u = [window_uniform(11, f"id{i}") for i in range(2000)]
    assert all(0.0 <= x < 1.0 for x in u)
    assert u == [window_uniform(11, f"id{i}") for i in range(2000)]
    assert u != [window_uniform(12, f"id{i}") for i in range(2000)]
    assert abs(np.mean(u) - 0.5) < 0.03 and abs(np.var(u) - 1 / 12) < 0.01


def test_budgeted_random_choice_fits_budget_and_is_uniform():
    ids = [f"w{i}" for i in range(10)]
    ntok = np.full(10, 100)
    counts = np.zeros(10)
    for seed in range(400):
        keep = budgeted_random_choice(ids, ntok, seed=seed, tokens=300)
        assert keep.sum() == 3 and ntok[keep].sum() <= 300
        counts += keep
    assert counts.min() > 0.2 * 400 and counts.max() < 0.4 * 400  # each window ~30 % of the time
    frac = budgeted_random_choice(ids, ntok, seed=1, fraction=0.5)
    assert frac.sum() == 5
    # the same windows whatever the input order
    perm = np.random.default_rng(0).permutation(10)
    again = budgeted_random_choice([ids[i] for i in perm], ntok[perm], seed=1, fraction=0.5)
    assert {ids[i] for i in perm[again]} == {ids[i] for i in np.flatnonzero(frac)}


@pytest.mark.parametrize("method", ["zscore", "minmax"])
def test_single_score_with_zero_var_ranks_by_score(method):
    ds = np.array([0.3, 2.0, -1.0, 0.7, 0.7])
    lds = lds_scores(ds, np.zeros(5), alpha=0.5, method=method)
    assert rank(lds).tolist() == rank(ds).tolist()


def run_select(out_dir: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "longattn.cli.select", f"out_dir={out_dir}", "window.length=256", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def tiny(tokenizer_dir) -> list[str]:
    return ["model=tiny_llama", f"model.tokenizer={tokenizer_dir}"]


@pytest.mark.parametrize("scorer,extra", [
    ("random", ["scorer.seed=3"]),
    ("prolong", ["scorer.chunk_size=32", "scorer.sample_size=-1", "model.num_hidden_layers=1",
                 "window.sample_size=3"]),
])
def test_baseline_through_select_cli(tmp_path, tiny, corpus, scorer, extra):
    out = tmp_path / scorer
    run_select(out, f"data.paths=[{corpus}]", *tiny, f"scorer={scorer}", *extra)
    scores, selected = read(out / "scores.jsonl"), read(out / "selected.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scorer"] == scorer and metrics["seconds_per_window"] is not None
    for cat, c in metrics["categories"].items():
        rows = [r for r in scores if r["category"] == cat]
        assert c["kept"] == len(rows) // 2
        kept = {r["data_id"] for r in rows if r["kept"]}
        best = sorted(rows, key=lambda r: -r["ds"])[: len(kept)]
        assert {r["data_id"] for r in best} == kept or len({r["ds"] for r in rows}) < len(rows)
        assert kept == {s["data_id"] for s in selected if s["category"] == cat}
    assert all(r["var"] == 0.0 for r in scores)
    if scorer == "random":
        assert all(r["ds"] == window_uniform(3, r["data_id"]) for r in scores)
    else:
        assert all(r["n_chunks"] == 8 and r["n_pairs"] == 28 and "prolong_lds" in r for r in scores)
