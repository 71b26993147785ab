"""`make demo` (longattn-demo, conf/demo.yaml + conf/experiment/demo.yaml): its configs compose into the three
methods' points, every method ranks at the demo's settings, the probe is computed from each selection's own
scores through the probe's code, and one method runs end to end (select -> train -> eval -> probe -> tables,
W&B offline) at even smaller settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, needs_smollm2

from longattn.experiments import tables as T
from longattn.experiments.demo import DemoConfig, compose_point, experiment_methods, labelled_scores
from longattn.selection.probe import auroc

METHODS = ["random", "prolong_smollm2", "longattn_smollm2"]


def test_demo_grid_composes_and_every_method_ranks():
    cfg = DemoConfig()
    assert experiment_methods(cfg) == METHODS
    points = {m: compose_point(cfg, m)[0] for m in METHODS}
    assert {p.method_label for p in points.values()} == {"Random", "ProLong-135M", "LongAttn-135M"}
    sel = {m: p.select.overrides for m, p in points.items()}
    assert {s["model"] for s in sel.values()} == {"smollm2_135m"}  # one tokenizer: one pool of windows
    assert len({(s["window.length"], s["window.sample_size"]) for s in sel.values()}) == 1
    assert {s["scorer"] for s in sel.values()} == {"random", "prolong", "longattn"}
    # ProLong's reference rule gives no pair score (LDS 0 for every window) when a window holds fewer pairs
    # than scorer.sample_size: the demo's windows must hold the pairs it samples.
    from longattn.selection.scorers.prolong import ProLongScorerConfig, sample_pairs

    n_chunks = sel["prolong_smollm2"]["window.length"] // ProLongScorerConfig().chunk_size
    import random

    pairs = sample_pairs(n_chunks, sel["prolong_smollm2"]["scorer.sample_size"], random.Random(11))
    assert len(pairs) == sel["prolong_smollm2"]["scorer.sample_size"] > 0
    assert all(p.wandb.enabled and p.wandb.group == "demo" for p in points.values())


def test_probe_rows_take_the_label_of_their_source_document(tmp_path):
    """scores.jsonl rows without source_id find it in windows.jsonl; unlabelled documents are left out."""
    rows = [{"data_id": f"a_{i}", "category": "a", "ds": float(i), "var": 0.0} for i in range(4)]
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = ["d1", "d1", "d2", "d3"]
    (tmp_path / "windows.jsonl").write_text("".join(json.dumps({"data_id": f"a_{i}", "source_id": s}) + "\n"
                                                    for i, s in enumerate(src)))
    got = labelled_scores(tmp_path, {"d1": 0, "d2": 1})
    assert [(r["data_id"], r["label"]) for r in got] == [("a_0", 0), ("a_1", 0), ("a_2", 1)]


def test_demo_table1_costs_relative_to_longattn():
    rows = [{"label": lab, "scorer": s, "model": "m", "window_length": 512, "kept": 18, "windows": 36,
             "tokens_kept": 9216, "niah": 0.25, "auroc": 0.6, "seconds_per_window": spw}
            for lab, s, spw in (("Random", "random", 1e-5), ("ProLong-135M", "prolong", 2.0),
                                ("LongAttn-135M", "longattn", 0.02))]
    t = T.demo_table1(rows, 512)
    by = {r[0]: dict(zip(t.columns, r, strict=True)) for r in t.rows}
    assert by["ProLong-135M"]["x LongAttn (real)"] == pytest.approx(100.0)
    assert by["LongAttn-135M"]["x LongAttn (real)"] == 1.0
    assert by["Random"]["RULER-NIAH 512 (plumbing)"] == 25.0  # percent, as the paper
    assert [by[k]["paper NIAH 32k"] for k in ("Random", "ProLong-135M", "LongAttn-135M")] == [78.2, 81.2, 82.3]


@needs_smollm2
@pytest.mark.slow
def test_demo_one_method_end_to_end_to_the_tables(tmp_path):
    pytest.importorskip("megatron.core", reason="the train extra is not installed")
    pytest.importorskip("lm_eval", reason="the eval extra is not installed")
    root = tmp_path / "demo"
    small = ["tokens=3414", "select.overrides={window.sample_size:4}",  # 4 windows per category, 2 kept
             "train.overrides={train.steps:1,train.save_every:1}",
             "eval.overrides={eval.limit:1,suite.ruler.num_samples:1}"]
    cmd = [sys.executable, "-m", "longattn.cli.demo", "methods=[random]", f"root={root}",
           "overrides=[" + ",".join(f"'{o}'" for o in small) + "]"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "demo-random: select ->" in out and "step 1/1" in out and "demo done" in out  # progress as it goes
    for name in ("Table 1 at demo scale", "Table 5: selection cost", "Selection-quality probe: AUROC"):
        assert name in out and name in (root / "tables" / "tables.md").read_text()
    assert "Plumbing: the RULER NIAH" in out and "| Random | smollm2_135m | 512 | 6 / 12 |" in out
    assert (root / "tables" / "demo.png").stat().st_size > 10_000

    point = json.loads((root / "points" / "demo-random.json").read_text())
    dirs = {s["stage"]: root / os.path.basename(s["out_dir"]) for s in point["stages"]}
    assert (dirs["select"] / "dataset" / "README.md").exists()
    # the probe: each scored window labelled by its source document, AUROC as the probe computes it
    probe = json.loads((root / "probe" / "random" / "probe.json").read_text())
    labels = {}
    import gzip

    for line in gzip.open(ROOT / "data" / "sample_corpus.jsonl.gz", "rt"):
        r = json.loads(line)
        labels[r["id"]] = r["label"]
    scores = [json.loads(x) for x in (dirs["select"] / "scores.jsonl").read_text().splitlines()]
    assert probe["results"][0]["n"] == len(scores) == 12
    arxiv = [r for r in scores if r["category"] == "arxiv"]
    y = np.array([labels[r["source_id"]] for r in arxiv])
    s = np.array([r["ds"] for r in arxiv])  # zscore is monotone: the raw score ranks the same
    assert probe["results"][0]["categories"]["arxiv"] == pytest.approx(auroc(s, y), nan_ok=True)
    # W&B offline: every stage of the method, the probe and the tables, one group
    for d in (*dirs.values(), root / "probe" / "random", root / "tables"):
        runs = list(d.rglob("offline-run-*"))
        assert runs, d
