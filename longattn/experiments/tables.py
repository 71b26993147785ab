"""Every paper table as a pure function: run records in, a ``Table`` out, with the paper's numbers beside ours.

- Evaluation tables (1, 2, 3, 4, 11 and the tokens curve) read the ``results.json`` of ``longattn-eval``, named by
  ``meta.label`` (``label.method``: Random, ProLong, LongAttn-8, LongAttn-70, LLaMA-3; ``label.tokens``: billions
  of training tokens; ``label.variant``: ``alpha=1`` or ``w/o DU`` for Table 4).
- Selection tables read the ``metrics.json`` of ``longattn-select``: Table 5 (cost per window, relative to
  LongAttn with the same model and device, and hours for the paper's 36B tokens) and Table 10 (DS / Var
  statistics per category); the probe table joins ``longattn-probe`` runs (AUROC per category).

``longattn-tables`` (``longattn.cli.tables``) writes them as Markdown, CSV and LaTeX.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.suites import LONGBENCH_CATEGORIES, RULER_TASKS, SHORT_TASKS
from longattn.selection.probe import best_setting

# The paper's numbers (docs/method.md, "The paper's tables"), keyed by (method, tokens in B, variant).
PAPER_TABLE1 = {("Random", 5, ""): 78.2, ("ProLong", 5, ""): 81.2, ("LongAttn-8", 5, ""): 82.3,
                ("LongAttn-70", 5, ""): 85.2, ("Random", 20, ""): 81.8}
PAPER_TABLE2 = {("LLaMA-3", 0, ""): 53.2, ("Random", 5, ""): 53.9, ("ProLong", 5, ""): 50.5,
                ("LongAttn-8", 5, ""): 54.2, ("LongAttn-70", 5, ""): 55.6}
PAPER_TABLE3 = {("Random", 5, ""): 24.46, ("ProLong", 5, ""): 26.93, ("LongAttn-8", 5, ""): 27.46,
                ("LongAttn-70", 5, ""): 26.78}
PAPER_TABLE4 = {("LongAttn-8", 3, ""): 80.83, ("LongAttn-8", 3, "alpha=1"): 79.49,
                ("LongAttn-8", 3, "w/o DU"): 78.28, ("LongAttn-8", 5, ""): 82.30,
                ("LongAttn-8", 5, "alpha=1"): 81.05, ("LongAttn-8", 5, "w/o DU"): 82.11}


@dataclass
class Table:
    name: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    note: str = ""
    """A line printed under the table (e.g. the probe's best setting)."""


def run_key(run: dict[str, Any]) -> tuple[str, float, str]:
    """(method, tokens, variant) from ``meta.label`` (``label.*`` keys), else from ``meta.extra`` tags."""
    meta = run.get("meta", {})
    tags = {**meta.get("extra", {}), **{k: v for k, v in meta.get("label", {}).items() if v not in (None, "")}}
    method = tags.get("method") or meta.get("model", "?")
    return str(method), float(tags.get("tokens") or 0), str(tags.get("variant") or "")


def label(key: tuple[str, float, str]) -> str:
    method, tokens, variant = key
    t = f"{tokens:g}B" if tokens else "base"
    return f"{method} {t}" + (f" ({variant})" if variant else "")


def _diff(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def _with_paper(name: str, cols: list[str], measured: dict[tuple, list[float | None]],
                paper: dict[tuple, float]) -> Table:
    """Rows of measured runs, then paper-only rows; the last three columns: ours, paper, difference."""
    t = Table(name, ["run", *cols, "paper", "diff"])
    keys = sorted(set(measured) | {(m, float(k), v) for m, k, v in paper}, key=lambda k: (k[1], k[0], k[2]))
    paper_f = {(m, float(k), v): x for (m, k, v), x in paper.items()}
    for k in keys:
        cells = measured.get(k, [None] * len(cols))
        t.rows.append([label(k), *cells, paper_f.get(k), _diff(cells[-1], paper_f.get(k))])
    return t


def _get(d: dict, *path: str) -> float | None:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return float(d)


def _at_32k(paper: dict[tuple, float], length: str) -> dict[tuple, float]:
    """The paper's RULER numbers are at 32k: no reference rows at other lengths."""
    return paper if length == "32768" else {}


def table1(runs: list[dict[str, Any]], length: str = "32768") -> Table:
    """RULER NIAH average (the eight needle tasks) at ``length``."""
    measured = {run_key(r): [_get(r, "categories", "ruler", "retrieval", length)] for r in runs if "ruler" in r}
    return _with_paper(f"Table 1: RULER-NIAH {length}", ["niah_avg"], measured, _at_32k(PAPER_TABLE1, length))


def table2(runs: list[dict[str, Any]]) -> Table:
    """Short suites: each task and their average."""
    measured = {run_key(r): [*(_get(r, "short", t, "all") for t in SHORT_TASKS), _get(r, "categories", "short", "avg")]
                for r in runs if "short" in r}
    return _with_paper("Table 2: short-context suites", [*SHORT_TASKS, "avg"], measured, PAPER_TABLE2)


def table3(runs: list[dict[str, Any]]) -> Table:
    """LongBench: the six categories (English and Chinese tasks mixed, as the paper), the per-language averages
    of LongBench's README (``avg_en``, ``avg_zh``: the code tasks in both) and the paper's average."""
    cats = list(LONGBENCH_CATEGORIES)
    measured = {run_key(r): [*(_get(r, "categories", "longbench", c) for c in cats),
                             *(_get(r, "categories", "longbench_by_language", lang, "avg") for lang in ("en", "zh")),
                             _get(r, "categories", "longbench", "avg")] for r in runs if "longbench" in r}
    return _with_paper("Table 3: LongBench", [*cats, "avg_en", "avg_zh", "avg"], measured, PAPER_TABLE3)


def table4(runs: list[dict[str, Any]], length: str = "32768") -> Table:
    """Ablation of alpha and DU: RULER-NIAH at ``length`` of LongAttn-8 runs by variant."""
    measured = {run_key(r): [_get(r, "categories", "ruler", "retrieval", length)]
                for r in runs if "ruler" in r and run_key(r)[0] == "LongAttn-8"}
    return _with_paper(f"Table 4: ablation, RULER-NIAH {length}", ["niah_avg"], measured,
                       _at_32k(PAPER_TABLE4, length))


def table11(runs: list[dict[str, Any]], length: str = "32768") -> Table:
    """All 13 RULER tasks at ``length`` (the paper's per-task numbers are not restated here: NIAH average as reference)."""
    names = list(RULER_TASKS)
    measured = {run_key(r): [*(_get(r, "ruler", n, length) for n in names),
                             _get(r, "categories", "ruler", "retrieval", length)] for r in runs if "ruler" in r}
    return _with_paper(f"Table 11: RULER {length}, all tasks", [*names, "niah_avg"], measured,
                       _at_32k(PAPER_TABLE1, length))


def from_rows(name: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Table:
    """A table from row dicts (selection tables), with ``columns`` in order (default: every key but ``source``)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r if k != "source"))
    return Table(name, columns, [[r.get(c) for c in columns] for r in rows])


def curve(runs: list[dict[str, Any]], length: str = "32768") -> dict[str, list[tuple[float, float]]]:
    """Figure 1b / 3: RULER-NIAH at ``length`` against training tokens, per method (default variant only)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        (method, tokens, variant), y = run_key(r), _get(r, "categories", "ruler", "retrieval", length)
        if y is not None and not variant:
            out.setdefault(method, []).append((tokens, y))
    return {m: sorted(v) for m, v in out.items()}


# ------------------------------------------------------------------------------------ selection tables
PAPER_TOKENS = 36e9
"""LongABC-32K-Raw: 12B tokens per category (docs/method.md §4)."""
PAPER_WINDOW = 32768
PAPER_COST = [  # Table 5: H800 GPU-hours on LongABC-32K-Raw
    ("prolong", "OPT-350M", 30.0), ("prolong", "LLaMA-3.1-8B", 600.0),
    ("longattn", "LLaMA-3.1-8B", 50.0), ("longattn", "LLaMA-3.1-70B", 100.0),
]
PAPER_STATS = {"model": "LLaMA-3.1-70B (paper)", "window_length": PAPER_WINDOW, "min_ds": 0.18, "max_ds": 0.59,
               "min_var": 1e-7, "max_var": 5e-6}
"""Table 10's ranges over its categories (docs/method.md §2)."""

COST_COLUMNS = ["method", "model", "device", "window_length", "windows", "seconds_per_window",
                "relative_to_longattn", "hours_36B_tokens", "source"]
STATS_COLUMNS = ["method", "model", "window_length", "category", "windows", "min_ds", "max_ds", "mean_ds",
                 "min_var", "max_var", "mean_var", "source"]


def find_metrics(dirs: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """``metrics.json`` of each run directory (or of its ``select/``; else every one below it)."""
    out = []
    for d in map(Path, dirs):
        hits = [p for p in (d / "metrics.json", d / "select" / "metrics.json") if p.is_file()]
        for p in hits[:1] or sorted(d.rglob("metrics.json")):
            out.append((p.parent, json.loads(p.read_text())))
    return out


def _device(m: dict[str, Any]) -> str:
    devs = m.get("devices") or ([m["device"]] if m.get("device") else [])
    return ", ".join(devs) or "?"


def cost_rows(runs: list[tuple[Path, dict[str, Any]]], *, paper: bool = True) -> list[dict[str, Any]]:
    """Table 5. Hours for 36B tokens are ``seconds_per_window x 36e9 / window_length``: exact at 32k; at a
    shorter window a linear extrapolation (LongAttn grows faster than linearly in L, ProLong with pairs)."""
    rows = []
    for path, m in runs:
        spw = m.get("seconds_per_window")
        if spw is None and m.get("windows"):
            spw = m["score_seconds"] / m["windows"]
        L = int(m["window_length"])
        rows.append({"method": m["scorer"], "model": m["model"], "device": _device(m), "window_length": L,
                     "windows": m.get("windows"), "seconds_per_window": spw,
                     "hours_36B_tokens": None if spw is None else spw * PAPER_TOKENS / L / 3600,
                     "source": str(path)})
    base = {(r["model"], r["window_length"], r["device"]): r["seconds_per_window"] for r in rows
            if r["method"] == "longattn" and r["seconds_per_window"]}
    for r in rows:
        b = base.get((r["model"], r["window_length"], r["device"]))
        r["relative_to_longattn"] = r["seconds_per_window"] / b if b and r["seconds_per_window"] else None
    if paper:
        n_windows = PAPER_TOKENS / PAPER_WINDOW
        ref = {model: h for method, model, h in PAPER_COST if method == "longattn"}
        for method, model, hours in PAPER_COST:
            rows.append({"method": method, "model": model, "device": "H800 (paper)", "window_length": PAPER_WINDOW,
                         "windows": round(n_windows), "seconds_per_window": hours * 3600 / n_windows,
                         "relative_to_longattn": hours / ref[model] if model in ref else None,
                         "hours_36B_tokens": hours, "source": "paper Table 5"})
    return rows


def stats_rows(runs: list[tuple[Path, dict[str, Any]]], *, paper: bool = True) -> list[dict[str, Any]]:
    """Table 10: DS / Var statistics per run and category."""
    rows = []
    for path, m in runs:
        for cat, c in sorted(m.get("categories", {}).items()):
            rows.append({"method": m["scorer"], "model": m["model"], "window_length": m["window_length"],
                         "category": cat, "windows": c.get("windows_in"),
                         **{k: c.get(k) for k in ("min_ds", "max_ds", "mean_ds", "min_var", "max_var", "mean_var")},
                         "source": str(path)})
    if paper:
        rows.append({"method": "longattn", "category": "all", "mean_ds": None, "mean_var": None, "windows": None,
                     "source": "paper Table 10", **PAPER_STATS})
    return rows


def table5(runs: list[tuple[Path, dict[str, Any]]], *, paper: bool = True) -> Table:
    return from_rows("Table 5: selection cost (GPU hours for 36B tokens)", cost_rows(runs, paper=paper), COST_COLUMNS)


def table10(runs: list[tuple[Path, dict[str, Any]]], *, paper: bool = True) -> Table:
    return from_rows("Table 10: DS / Var statistics", stats_rows(runs, paper=paper), STATS_COLUMNS)


def probe_results(dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """``probe.json`` of every ``longattn-probe`` run under ``dirs``."""
    return [json.loads(p.read_text()) for d in map(Path, dirs) for p in sorted(Path(d).rglob("probe.json"))]


def probe_table(results: list[dict[str, Any]]) -> Table:
    """AUROC (label 1 = genuine long document) per category and overall, a row per run, normalisation and alpha."""
    cats = sorted({c for r in results for e in r["results"] for c in e["categories"]})
    t = Table("Selection-quality probe: AUROC", ["config", "normalize", "alpha", *cats, "overall", "n"])
    t.rows = [[r["tag"], e["normalize"], e["alpha"], *(e["categories"].get(c) for c in cats), e["overall"], e["n"]]
              for r in results for e in r["results"]]
    t.note = best_setting(results)
    return t


# ------------------------------------------------------------------------------------ the demo
PAPER_FAMILY = {"random": "Random", "prolong": "ProLong", "longattn": "LongAttn-8"}
"""Scorer -> the paper's Table 1 row of the same method (LLaMA-3-8B trained on 5B tokens, RULER NIAH at 32k)."""


def demo_table1(rows: list[dict[str, Any]], length: int) -> Table:
    """Table 1 at CPU scale, one row per method: what it kept, the trained model's RULER NIAH at ``length``
    (plumbing), the probe AUROC and the cost per window (real: measured on the same windows), and the
    paper's Table 1 number of the same method for its shape. Rows: ``label``, ``scorer``, ``model``,
    ``window_length``, ``kept``, ``windows``, ``tokens_kept``, ``niah`` (0-1), ``auroc``, ``seconds_per_window``."""
    base = {(r["model"], r["window_length"]): r["seconds_per_window"] for r in rows
            if r["scorer"] == "longattn" and r["seconds_per_window"]}
    t = Table("Table 1 at demo scale (paper: RULER-NIAH 32k after 5B tokens)",
              ["method", "scoring model", "window", "kept / windows", "tokens kept",
               f"RULER-NIAH {length} (plumbing)", "probe AUROC (real)", "s / window (real)", "x LongAttn (real)",
               "paper NIAH 32k"])
    for r in rows:
        b, spw = base.get((r["model"], r["window_length"])), r["seconds_per_window"]
        niah = None if r["niah"] is None else 100 * r["niah"]
        t.rows.append([r["label"], r["model"], r["window_length"], f"{r['kept']} / {r['windows']}", r["tokens_kept"],
                       niah, r["auroc"], spw, spw / b if b and spw else None,
                       PAPER_TABLE1.get((PAPER_FAMILY.get(r["scorer"], ""), 5, ""))])
    t.note = ("RULER-NIAH in %, as the paper; probe AUROC over the scored windows (label of the source document: "
              "genuine long document vs concatenation; 0.5 = chance), zscore and alpha 0.5 as the selection.")
    return t


# ---------------------------------------------------------------- writers


def _fmt(x: Any) -> str:
    """Scores with 2 decimals, fractions (AUROC, seconds) with 3, tiny or huge numbers with 3 significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) < 1e-2 or abs(x) >= 1e5:
            return f"{x:.3g}"
        return f"{x:.3f}" if abs(x) < 1 else f"{x:.2f}"
    return str(x)


def to_markdown(t: Table) -> str:
    lines = [f"**{t.name}**", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines + ([f"\n{t.note}"] if t.note else [])) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(t.columns)
    w.writerows([["" if c is None else c for c in row] for row in t.rows])
    return buf.getvalue()


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(t: Table) -> str:
    head = " & ".join(_tex(c) for c in t.columns) + r" \\"
    body = [" & ".join(_tex(_fmt(c)).replace("–", "--") for c in row) + r" \\" for row in t.rows]
    return "\n".join([r"\begin{table}[t]", r"\centering", f"\\caption{{{_tex(t.name)}}}",
                      r"\begin{tabular}{l" + "r" * (len(t.columns) - 1) + "}", r"\toprule", head, r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}", r"\end{table}"]) + "\n"
