"""Tables 5 and 10 and the probe table from run directories (fabricated metrics.json / probe.json) and the CLI."""

from __future__ import annotations

import json

import pytest

from longattn.cli.tables import main
from longattn.experiments.tables import (
    PAPER_TOKENS,
    cost_rows,
    find_metrics,
    from_rows,
    stats_rows,
    to_csv,
    to_markdown,
)


def metrics(scorer: str, spw: float, length: int = 2048, model: str = "smollm2_135m") -> dict:
    cats = {"book": {"windows_in": 4, "min_ds": 0.2, "max_ds": 0.5, "mean_ds": 0.3, "min_var": 1e-7,
                     "max_var": 3e-6, "mean_var": 1e-6}}
    return {"scorer": scorer, "model": model, "window_length": length, "devices": ["cpu"], "windows": 4,
            "score_seconds": 4 * spw, "seconds_per_window": spw, "categories": cats}


@pytest.fixture()
def runs(tmp_path):
    for name, m in {"la": metrics("longattn", 0.5), "pl": metrics("prolong", 20.0),
                    "probe/select": metrics("random", 0.001)}.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    return tmp_path


def test_cost_rows_ratio_and_extrapolation(runs):
    found = find_metrics([runs / "la", runs / "pl", runs / "probe"])
    assert [m["scorer"] for _, m in found] == ["longattn", "prolong", "random"]
    rows = {r["method"] + r["device"]: r for r in cost_rows(found)}
    assert rows["prolongcpu"]["relative_to_longattn"] == pytest.approx(40.0)
    assert rows["longattncpu"]["hours_36B_tokens"] == pytest.approx(0.5 * PAPER_TOKENS / 2048 / 3600)
    paper = [r for r in cost_rows(found) if r["source"] == "paper Table 5"]
    assert [r["hours_36B_tokens"] for r in paper] == [30.0, 600.0, 50.0, 100.0]
    # LongAttn-8B: 50 h over ~1.1M windows = ~0.16 s per window (docs/method.md §4); ProLong-8B is 12x LongAttn-8B
    assert paper[2]["seconds_per_window"] == pytest.approx(0.164, abs=1e-3)
    assert paper[1]["relative_to_longattn"] == pytest.approx(12.0)


def test_stats_rows_and_formats(runs):
    rows = stats_rows(find_metrics([runs / "la"]))
    assert rows[0]["category"] == "book" and rows[0]["max_var"] == 3e-6
    assert rows[-1]["source"] == "paper Table 10" and rows[-1]["max_ds"] == 0.59
    md = to_markdown(from_rows("t10", rows, ["method", "category", "min_ds", "max_var"]))
    assert "| longattn | book | 0.200 | 3e-06 |" in md
    assert to_csv(from_rows("t10", rows[:1], ["method", "min_ds"])) == "method,min_ds\r\nlongattn,0.2\r\n"


def test_cli_writes_markdown_and_csv(runs, tmp_path, capsys):
    main(["--select", str(runs / "la"), str(runs / "pl"), "--out", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert "| prolong | smollm2_135m | cpu | 2048 | 4 | 20.00 | 40.00 |" in out
    assert "**Table 1:" not in out  # no eval runs given: no evaluation tables
    assert (tmp_path / "t" / "table5.csv").read_text().startswith("method,model,device")
    assert "H800 (paper)" in (tmp_path / "t" / "table5.md").read_text()
    main(["--select", str(runs), "--no-paper", "--out", str(tmp_path / "t2")])
    assert "paper" not in (tmp_path / "t2" / "table10.md").read_text()


def test_probe_tables_joined_with_best(tmp_path, capsys):
    for tag, auc in (("a", 0.4), ("b", 0.8)):
        (tmp_path / tag).mkdir()
        res = {"tag": tag, "results": [{"normalize": "zscore", "alpha": 0.5, "n": 4, "overall": auc,
                                        "categories": {"book": auc}}]}
        (tmp_path / tag / "probe.json").write_text(json.dumps(res))
    main(["--probe", str(tmp_path), "--out", str(tmp_path / "t")])
    out = capsys.readouterr().out
    assert "| b | zscore | 0.500 | 0.800 | 0.800 | 4 |" in out and "best separation: b (zscore, alpha 0.5)" in out
    assert (tmp_path / "t" / "probe.csv").read_text().splitlines()[0] == "config,normalize,alpha,book,overall,n"
