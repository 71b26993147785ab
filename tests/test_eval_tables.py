"""Paper tables from inline result dicts: rows, paper references, differences, writers, CLI."""

from __future__ import annotations

import json

import pytest

from longattn.cli.tables import main, unflatten
from longattn.experiments import tables as T


def _run(method, tokens, niah, variant="", lb_avg=None, short=None):
    doc = {"meta": {"extra": {"method": method, "tokens": tokens, "variant": variant}},
           "ruler": {"niah_single_1": {"32768": niah}, "vt": {"32768": 10.0}},
           "categories": {"ruler": {"retrieval": {"32768": niah}}}}
    if lb_avg is not None:
        doc["longbench"] = {"lcc": {"all": lb_avg}}
        doc["categories"]["longbench"] = {"code": lb_avg, "avg": lb_avg}
        doc["categories"]["longbench_by_language"] = {"en": {"code": lb_avg, "avg": lb_avg + 1},
                                                      "zh": {"code": lb_avg, "avg": lb_avg - 1}}
    if short is not None:
        doc["short"] = {t: {"all": short} for t in ("mmlu", "hellaswag", "humaneval", "openbookqa")}
        doc["categories"]["short"] = {"avg": short}
    return doc


RUNS = [_run("Random", 5, 80.2, lb_avg=25.0, short=50.0), _run("LongAttn-8", 5, 83.3),
        _run("LongAttn-8", 3, 79.0, variant="w/o DU"), _run("LongAttn-8", 1, 70.0)]


def test_run_key_label_over_extra():
    doc = {"meta": {"model": "ckpt", "label": {"method": "ProLong", "tokens": 5.0, "variant": ""},
                    "extra": {"method": "old", "variant": "alpha=1"}}}
    assert T.run_key(doc) == ("ProLong", 5.0, "alpha=1")
    assert T.run_key({"meta": {"model": "ckpt", "label": {"method": None, "tokens": None}}}) == ("ckpt", 0.0, "")


def _row(t, lab):
    return next(r for r in t.rows if r[0] == lab)


def test_table1_measured_paper_and_diff():
    t = T.table1(RUNS)
    assert t.columns == ["run", "niah_avg", "paper", "diff"]
    assert _row(t, "Random 5B")[1:] == [80.2, 78.2, pytest.approx(2.0)]
    assert _row(t, "LongAttn-8 5B")[3] == pytest.approx(1.0)
    assert _row(t, "ProLong 5B") == ["ProLong 5B", None, 81.2, None]  # paper-only reference row
    assert _row(t, "LongAttn-8 1B")[2:] == [None, None]


def test_no_paper_rows_at_other_lengths():
    rows = T.table1(RUNS, length="4096").rows
    assert len(rows) == len(RUNS) and all(r[1:] == [None, None, None] for r in rows)


def test_table4_ablation_variants():
    t = T.table4(RUNS)
    assert _row(t, "LongAttn-8 3B (w/o DU)")[1:] == [79.0, 78.28, pytest.approx(0.72)]
    assert _row(t, "LongAttn-8 5B (alpha=1)")[1:] == [None, 81.05, None]


def test_table2_table3_table11():
    assert _row(T.table2(RUNS), "Random 5B")[1:] == [50.0] * 5 + [53.9, pytest.approx(-3.9)]
    t3 = T.table3(RUNS)
    r3 = _row(t3, "Random 5B")
    assert t3.columns[-5:] == ["avg_en", "avg_zh", "avg", "paper", "diff"]
    assert r3[-5:] == [26.0, 24.0, 25.0, 24.46, pytest.approx(0.54)]  # per language as LongBench's README
    t11 = T.table11(RUNS)
    assert len(t11.columns) == 1 + 13 + 1 + 2 and _row(t11, "Random 5B")[1] == 80.2


def test_from_rows():
    t = T.from_rows("x", [{"a": 1, "source": "p"}, {"b": 2.0}])
    assert t.columns == ["a", "b"] and t.rows == [[1, None], [None, 2.0]]


def test_curve_and_writers():
    assert T.curve(RUNS)["LongAttn-8"] == [(1.0, 70.0), (5.0, 83.3)]
    t = T.table1(RUNS)
    md, csv, tex = T.to_markdown(t), T.to_csv(t), T.to_latex(t)
    assert "| Random 5B | 80.20 | 78.20 | 2.00 |" in md
    assert csv.splitlines()[0] == "run,niah_avg,paper,diff"
    assert r"\begin{tabular}{lrrr}" in tex and r"niah\_avg" in tex


def test_unflatten_wandb_summary():
    doc = unflatten({"eval/ruler/vt/32768": 12.0, "eval/categories/ruler/retrieval/32768": 80.0, "_step": 1},
                    {"method": "Random", "tokens": 5})
    assert doc["ruler"]["vt"]["32768"] == 12.0
    assert _row(T.table1([doc]), "Random 5B")[1] == 80.0


def test_tables_cli_writes_all_formats(tmp_path, capsys):
    dirs = []
    for i, r in enumerate(RUNS):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        dirs.append(str(d))
    sel = tmp_path / "sel"
    sel.mkdir()
    (sel / "metrics.json").write_text(json.dumps({"model": "m", "scorer": "longattn", "score_seconds": 1.0,
                                                  "windows": 2, "window_length": 2048, "categories": {
                                                      "book": {"windows_in": 2, "mean_ds": 0.3}}}))
    main([*dirs, "--select", str(sel), "--out", str(tmp_path / "tables")])
    out = tmp_path / "tables"
    for n in ("table1", "table2", "table3", "table4", "table11", "table5", "table10"):
        assert (out / f"{n}.md").exists() and (out / f"{n}.csv").exists() and (out / f"{n}.tex").exists()
    assert (out / "niah_vs_tokens.png").stat().st_size > 1000
    assert "Table 1" in capsys.readouterr().out
