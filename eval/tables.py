"""The paper's tables as pure functions: result dicts in, rows out, with the paper's numbers and the difference.

A run is the ``results.json`` of ``longattn-eval`` whose ``meta.label`` names it (``label.method``: Random,
ProLong, LongAttn-8, LongAttn-70, LLaMA-3; ``label.tokens``: billions of training tokens; ``label.variant``:
``alpha=1`` or ``w/o DU`` for Table 4). Selection runs are their ``metrics.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from eval.suites import LONGBENCH_CATEGORIES, RULER_TASKS, SHORT_TASKS

# Paper numbers (SPEC.md "Paper tables"), keyed by (method, tokens in B, variant).
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
    """LongBench: the six categories and their average."""
    cats = list(LONGBENCH_CATEGORIES)
    measured = {run_key(r): [*(_get(r, "categories", "longbench", c) for c in cats),
                             _get(r, "categories", "longbench", "avg")] for r in runs if "longbench" in r}
    return _with_paper("Table 3: LongBench", [*cats, "avg"], measured, PAPER_TABLE3)


def table4(runs: list[dict[str, Any]], length: str = "32768") -> Table:
    """Ablation of alpha and DU: RULER-NIAH at ``length`` of LongAttn-8 runs by variant."""
    measured = {run_key(r): [_get(r, "categories", "ruler", "retrieval", length)]
                for r in runs if "ruler" in r and run_key(r)[0] == "LongAttn-8"}
    return _with_paper(f"Table 4: ablation, RULER-NIAH {length}", ["niah_avg"], measured,
                       _at_32k(PAPER_TABLE4, length))


def table11(runs: list[dict[str, Any]], length: str = "32768") -> Table:
    """All 13 RULER tasks at ``length`` (no per-task paper numbers in SPEC.md: NIAH average as reference)."""
    names = list(RULER_TASKS)
    measured = {run_key(r): [*(_get(r, "ruler", n, length) for n in names),
                             _get(r, "categories", "ruler", "retrieval", length)] for r in runs if "ruler" in r}
    return _with_paper(f"Table 11: RULER {length}, all tasks", [*names, "niah_avg"], measured,
                       _at_32k(PAPER_TABLE1, length))


def from_rows(name: str, rows: list[dict[str, Any]]) -> Table:
    """A table from row dicts: Tables 5 and 10 come from the selection stage's own ``longattn.tables``."""
    columns = list(dict.fromkeys(k for r in rows for k in r if k != "source"))
    return Table(name, columns, [[r.get(c) for c in columns] for r in rows])


def curve(runs: list[dict[str, Any]], length: str = "32768") -> dict[str, list[tuple[float, float]]]:
    """Figure 1b / 3: RULER-NIAH at ``length`` against training tokens, per method (default variant only)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        (method, tokens, variant), y = run_key(r), _get(r, "categories", "ruler", "retrieval", length)
        if y is not None and not variant:
            out.setdefault(method, []).append((tokens, y))
    return {m: sorted(v) for m, v in out.items()}


# ---------------------------------------------------------------- writers


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-2 and x != 0 else f"{x:.2f}"
    return str(x)


def to_markdown(t: Table) -> str:
    lines = [f"**{t.name}**", "", "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    import csv
    import io

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
