"""``longattn-tables``: every paper table (Markdown, CSV, LaTeX) and the tokens curve from run directories.

    longattn-tables runs/eval/* --select runs/select/* --out runs/tables [--length 32768]
    longattn-tables --points runs/experiments --out runs/tables     # every point a pipeline ran
    longattn-tables --wandb-project longattn --wandb-group paper --out runs/tables
    longattn-tables --select runs/sel_a runs/sel_b --probe runs/probe --out runs/tables   # Tables 5, 10, probe

An eval run is named by its label (``label.method=LongAttn-8 label.tokens=5``); a reader tool, so plain
argparse: nothing to compose.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from longattn.experiments import tables as T

log = logging.getLogger(__name__)


def read_runs(dirs: list[str]) -> list[dict[str, Any]]:
    """results.json of each directory (or file) given; directories without one are skipped with a warning."""
    runs = []
    for d in dirs:
        p = Path(d) / "results.json" if Path(d).is_dir() else Path(d)
        if p.exists():
            runs.append(json.loads(p.read_text(encoding="utf-8")))
        else:
            log.warning("no results.json in %s", d)
    return runs


def unflatten(summary: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A W&B summary (``eval/suite/task/col`` keys, as eval.run logs them) back into a results dict."""
    doc: dict[str, Any] = {"meta": {"extra": extra}}
    for key, value in summary.items():
        if not key.startswith("eval/") or not isinstance(value, int | float):
            continue
        node = doc
        *path, leaf = key.split("/")[1:]
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return doc


def read_wandb(project: str, group: str | None) -> list[dict[str, Any]]:
    import wandb  # lazily: optional extra, needs network or a local server

    filters = {"jobType": "eval", **({"group": group} if group else {})}
    runs = wandb.Api().runs(project, filters=filters)
    return [unflatten(dict(r.summary), {**r.config.get("extra", {}), **r.config.get("label", {})}) for r in runs]


def read_points(root: str) -> tuple[list[str], list[str]]:
    """Eval and selection directories of the points ``longattn-pipeline`` ran under ``root``."""
    evals: list[str] = []
    selects: list[str] = []
    for p in sorted(Path(root, "points").glob("*.json")):
        for stage in json.loads(p.read_text(encoding="utf-8"))["stages"]:
            dirs = {"eval": evals, "select": selects}.get(stage["stage"])
            if dirs is not None and stage.get("done") and stage["out_dir"] not in dirs:
                dirs.append(stage["out_dir"])
    return evals, selects


def plot_curve(runs: list[dict[str, Any]], path: Path, length: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, pts in T.curve(runs, length).items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
    ax.set_xlabel("training tokens (B)")
    ax.set_ylabel(f"RULER-NIAH {int(length) // 1024}k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def build_tables(runs: list[dict[str, Any]], select_dirs: list[str], length: str, probe_dirs: list[str] = (),
                 paper: bool = True) -> dict[str, T.Table]:
    """The tables the given runs can fill: evaluation tables from ``runs``, Tables 5 and 10 from selection
    directories, the probe table from probe directories."""
    out: dict[str, T.Table] = {}
    if runs:
        out |= {"table1": T.table1(runs, length), "table2": T.table2(runs), "table3": T.table3(runs),
                "table4": T.table4(runs, length), "table11": T.table11(runs, length)}
    if select_dirs:
        sel = T.find_metrics(select_dirs)
        out |= {"table5": T.table5(sel, paper=paper), "table10": T.table10(sel, paper=paper)}
    if probe_dirs:
        out["probe"] = T.probe_table(T.probe_results(probe_dirs))
    return out


def write_tables(tables: dict[str, T.Table], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        (out / f"{name}.md").write_text(T.to_markdown(t), encoding="utf-8")
        (out / f"{name}.csv").write_text(T.to_csv(t), encoding="utf-8")
        (out / f"{name}.tex").write_text(T.to_latex(t), encoding="utf-8")
    (out / "tables.md").write_text("\n".join(T.to_markdown(t) for t in tables.values()), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="longattn-tables", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="eval run directories (results.json)")
    ap.add_argument("--select", nargs="*", default=[], help="selection run directories (metrics.json)")
    ap.add_argument("--wandb-project", help="read eval runs from this W&B project instead")
    ap.add_argument("--wandb-group")
    ap.add_argument("--points", help="a longattn-pipeline root: read the eval and selection runs of its points")
    ap.add_argument("--probe", nargs="*", default=[], help="longattn-probe run directories (probe.json)")
    ap.add_argument("--no-paper", action="store_true", help="leave the paper's rows out of Tables 5 and 10")
    ap.add_argument("--length", default="32768", help="RULER length of Tables 1, 4, 11 and the curve")
    ap.add_argument("--out", default="runs/tables")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    run_dirs, select_dirs = list(args.runs), list(args.select)
    if args.points:
        evals, selects = read_points(args.points)
        run_dirs, select_dirs = run_dirs + evals, select_dirs + selects
    runs = read_wandb(args.wandb_project, args.wandb_group) if args.wandb_project else read_runs(run_dirs)
    tables = build_tables(runs, select_dirs, args.length, args.probe, paper=not args.no_paper)
    if not tables:
        ap.error("nothing to tabulate: give eval run directories, --select, --probe, --points or --wandb-project")
    out = Path(args.out)
    write_tables(tables, out)
    if runs:
        plot_curve(runs, out / "niah_vs_tokens.png", args.length)
    print((out / "tables.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
