"""The selection-quality probe: AUROC, the table, building labelled sets, and a small multirun over scorers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SAMPLE

from longattn.selection.probe import BuildConfig, auroc, build_labelled, markdown_table, probe_table


def test_auroc_by_hand_and_ties():
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0])) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0])) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 0])) == 0.5
    # pairs (pos, neg): (3,1) win, (3,3) tie, (2,1) win, (2,3) loss -> (1 + .5 + 1 + 0) / 4
    assert auroc(np.array([3.0, 2.0, 1.0, 3.0]), np.array([1, 1, 0, 0])) == 0.625
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_auroc_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s = rng.integers(0, 20, 300).astype(float)  # many ties
    y = rng.integers(0, 2, 300)
    assert auroc(s, y) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)


def test_probe_table_normalises_per_category():
    rows = [{"category": "a", "label": 1, "ds": 10.0, "var": 0.0}, {"category": "a", "label": 0, "ds": 9.0, "var": 0.0},
            {"category": "b", "label": 1, "ds": 2.0, "var": 0.0}, {"category": "b", "label": 0, "ds": 1.0, "var": 0.0}]
    (z,) = probe_table(rows, ["zscore"], [0.5])
    assert z["categories"] == {"a": 1.0, "b": 1.0}
    assert z["overall"] == 1.0  # pooled raw scores would give 0.75: b's positive is below a's negative
    assert auroc(np.array([r["ds"] for r in rows]), np.array([r["label"] for r in rows])) == 0.75
    md = markdown_table([{"tag": "x", "results": [z]}])
    assert "| x | zscore | 0.5 | 1.000 | 1.000 | 1.000 | 4 |" in md


def test_build_labelled_concat_and_shuffle():
    docs = [{"category": "c", "content": "L" * 100}, *({"category": "c", "content": f"s{i} " * 5} for i in range(12))]
    out = list(build_labelled(iter(docs), BuildConfig(negatives="concat", chars=50, short_chars=30), "text"))
    assert [r["label"] for r in out] == [1, 0, 0, 0]  # 4 short pieces (15-20 chars + "\n\n") per negative
    assert all(len(r["text"]) == 50 for r in out)
    longs = [{"category": "c", "text": str(k) * 40} for k in range(3)]
    mixed = list(build_labelled(iter(longs), BuildConfig(negatives="shuffle", chars=40, block_chars=10, group=3),
                                "text"))
    assert [r["label"] for r in mixed] == [1, 0, 1, 0, 1, 0]
    assert mixed[1]["text"] == "0" * 10 + "1" * 10 + "2" * 10 + "0" * 10


def test_probe_multirun_over_scorers(tmp_path, tokenizer_dir):
    root = tmp_path / "probe"
    cmd = [sys.executable, "-m", "longattn.cli.probe", "-m", "scorer=longattn,random", f"data.paths=[{SAMPLE}]",
           "data.per_group=1", "window.length=256", "model=tiny_llama", f"model.tokenizer={tokenizer_dir}",
           f"out_dir={root}/" + "${scorer.name}", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "AUROC" in proc.stdout and "| longattn/tiny_llama | minmax |" in proc.stdout
    for name in ("longattn", "random"):
        res = json.loads((root / name / "probe.json").read_text())
        assert [e["normalize"] for e in res["results"]] == ["zscore", "minmax"]
        assert set(res["results"][0]["categories"]) == {"arxiv", "book", "code"}
        assert res["results"][0]["n"] == 6 and (root / name / "probe.png").exists()
    # The random scorer's AUROC, recomputed independently from each record's seeded uniform number and label.
    from longattn.selection.scorers.random_scorer import window_uniform

    inputs = [json.loads(line) for line in (root / "random" / "probe_input.jsonl").read_text().splitlines()]
    res = json.loads((root / "random" / "probe.json").read_text())
    for cat in ("arxiv", "book", "code"):
        recs = [r for r in inputs if r["category"] == cat]
        u = np.array([window_uniform(11, r["data_id"]) for r in recs])
        expect = auroc(u, np.array([r["label"] for r in recs]))
        assert res["results"][0]["categories"][cat] == pytest.approx(expect) and expect in (0.0, 1.0)
    # LongAttn's: the labels are joined to the right windows (AUROC of the scored DS / Var per category).
    labels = {r["data_id"]: r["label"] for r in inputs}
    scores = [json.loads(line) for line in (root / "longattn" / "select" / "scores.jsonl").read_text().splitlines()]
    res = json.loads((root / "longattn" / "probe.json").read_text())
    for cat in ("arxiv", "book", "code"):
        rows = [r for r in scores if r["category"] == cat]
        ds, var = np.array([r["ds"] for r in rows]), np.array([r["var"] for r in rows])
        lds = ds / ds.std(ddof=1) - 0.5 * var / var.std(ddof=1)  # the z-scored LDS up to a shift
        y = np.array([labels[r["data_id"]] for r in rows])
        assert res["results"][0]["categories"][cat] == pytest.approx(auroc(lds, y))


@pytest.mark.parametrize("scorer", ["longattn", "prolong", "random", "longattn_layers"])
def test_every_scorer_composes_into_probe_and_select(scorer, tmp_path):
    from hydra import compose, initialize_config_dir

    from longattn.cli import probe, select
    from longattn.common.hydra_app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = probe.to_schema(compose("probe", [f"scorer={scorer}"]))
        assert cfg.scorer.name == scorer and cfg.window.length == 2048
        sel = select.to_schema(compose("select", [f"scorer={scorer}", "model=opt_350m", f"model.path={tmp_path}",
                                                  f"data.paths=[{SAMPLE}]"]))
        assert sel.model.name == "opt_350m" and sel.scorer.name == scorer
