"""``longattn-select-tables``: the paper's cost and statistics tables from run directories, as Markdown and CSV.

- ``cost``: Table 5 — seconds per window of each (method, model, device), the cost relative to LongAttn with
  the same model, window length and device, and hours extrapolated to the paper's 36B tokens (~1.1M windows
  of 32k), next to the paper's H800-hours.
- ``stats``: Table 10 — min / max / mean of DS and Var per category (from ``metrics.json`` ``categories``).
- ``probe``: the AUROC tables of several ``longattn-probe`` runs joined.

Inputs are run directories (``longattn-select`` out_dirs, or probe out_dirs whose ``select/`` is used).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["PAPER_COST", "PAPER_STATS", "PAPER_TOKENS", "cost_rows", "stats_rows", "to_markdown", "to_csv",
           "main"]

PAPER_TOKENS = 36e9
"""LongABC-32K-Raw: 12B tokens per category (SPEC 1.4)."""
PAPER_WINDOW = 32768
PAPER_COST = [  # Table 5: H800 GPU-hours on LongABC-32K-Raw
    ("prolong", "OPT-350M", 30.0), ("prolong", "LLaMA-3.1-8B", 600.0),
    ("longattn", "LLaMA-3.1-8B", 50.0), ("longattn", "LLaMA-3.1-70B", 100.0),
]
PAPER_STATS = {"model": "LLaMA-3.1-70B (paper)", "window_length": PAPER_WINDOW, "min_ds": 0.18, "max_ds": 0.59,
               "min_var": 1e-7, "max_var": 5e-6}
"""Table 10's ranges over its categories (SPEC 1.2)."""

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


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def to_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _probe(dirs: list[str]) -> tuple[str, str]:
    from longattn.probe import best_setting, markdown_table

    results = [json.loads(p.read_text()) for d in map(Path, dirs) for p in sorted(d.rglob("probe.json"))]
    md = markdown_table(results) + "\n\n" + best_setting(results)
    cats = sorted({c for r in results for e in r["results"] for c in e["categories"]})
    rows = [{"config": r["tag"], "normalize": e["normalize"], "alpha": e["alpha"], **e["categories"],
             "overall": e["overall"], "n": e["n"]} for r in results for e in r["results"]]
    return md, to_csv(rows, ["config", "normalize", "alpha", *cats, "overall", "n"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="longattn-select-tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("table", choices=["cost", "stats", "probe"], help="cost = Table 5, stats = Table 10, probe = AUROC")
    ap.add_argument("dirs", nargs="+", help="run directories (longattn-select / longattn-probe out_dirs)")
    ap.add_argument("--out", help="directory for <table>.md and <table>.csv (default: print only)")
    ap.add_argument("--no-paper", action="store_true", help="leave out the paper's reference rows")
    args = ap.parse_args(argv)
    if args.table == "probe":
        md, text = _probe(args.dirs)
    else:
        runs = find_metrics(args.dirs)
        build, cols = (cost_rows, COST_COLUMNS) if args.table == "cost" else (stats_rows, STATS_COLUMNS)
        rows = build(runs, paper=not args.no_paper)
        md, text = to_markdown(rows, cols), to_csv(rows, cols)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = {"cost": "table5_cost", "stats": "table10_stats", "probe": "probe_auroc"}[args.table]
        (out / f"{name}.md").write_text(md + "\n")
        (out / f"{name}.csv").write_text(text)
        print(f"\nwrote {out / name}.md and .csv")


if __name__ == "__main__":
    main()
