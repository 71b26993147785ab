"""``longattn-demo`` (``make demo``): the whole job on a CPU — select, probe, train, evaluate, tables.

1. The points of an experiment's grid (``conf/experiment/demo.yaml``: one per selection method) run through
   ``longattn-pipeline`` (select -> train -> eval, content-addressed stage directories, W&B in one group):
   first the selections one at a time (so each cost per window is measured alone), then training and
   evaluation ``jobs`` points at a time; their logs go to ``root/logs/`` and a line per step to the console.
2. The selection-quality probe of every selection, from its own ``scores.jsonl``: each scored window takes the
   label of its source document (``source_id`` -> the input record's ``label``: 1 = one genuine long
   document, 0 = short texts glued together), and ``longattn.selection.probe.probe_table`` gives the AUROC
   per category, as ``longattn-probe`` would — nothing is scored twice.
3. The tables: a Table 1-shaped summary (RULER NIAH, probe AUROC, cost per window per method), Table 5
   (cost), Table 10 (score statistics) and the probe table; printed, written as Markdown and one PNG figure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from longattn.common.io import iter_records, read_jsonl, write_json
from longattn.common.tracking import MetricsLogger, WandbConfig
from longattn.experiments import tables as T
from longattn.selection import probe as P

log = logging.getLogger(__name__)

__all__ = ["DemoConfig", "run_demo", "probe_selection", "register_configs"]

PROGRESS = re.compile(r"\]\[(longattn\.experiments\.pipeline|longattn\.selection\.(progress|dataset)|train\.loop|"
                      r"eval\.prepare|eval\.run)\]\[\w+\] - |^scored \d+ windows")
"""Lines of a point's log echoed to the console (the whole log is in ``root/logs/<point>.log``)."""

def real_vs_plumbing(windows_per_category: float) -> str:
    """What the demo's numbers mean at this scale (printed under the tables and in the README)."""
    n = max(windows_per_category, 2.0)
    sd = ((n + 1) / (3 * n * n)) ** 0.5  # a chance AUROC with n/2 windows of each label (Mann-Whitney)
    return (
        f"Real at this scale: the probe AUROC (the scores of the same windows, labelled by their source "
        f"document; with {n:g} windows per category a chance AUROC has a standard deviation of about {sd:.2f}) "
        "and the cost per window and its ratio to LongAttn (measured in this run, each selection alone, on "
        "this machine: other load changes them). Plumbing: the RULER NIAH scores (a 64-wide random tiny LLaMA "
        "trained for a few steps retrieves nothing; they show that each trained model is exported, loaded and "
        "evaluated, not that one selection trains better than another).")


@dataclass
class DemoConfig:
    experiment: str = "demo"
    """Pipeline experiment (``conf/experiment/NAME.yaml``) whose grid of methods runs."""
    methods: list[str] = field(default_factory=list)
    """Methods to run; empty = the experiment's grid (``hydra.sweeper.params.method``)."""
    root: str = "runs/demo"
    """Stage directories, points, logs, the probe and the tables go under here."""
    overrides: list[str] = field(default_factory=list)
    """Extra ``longattn-pipeline`` overrides for every point (smaller settings in tests)."""
    jobs: int = 3
    """Points run at the same time (their single-threaded start-up and I/O overlap on a 2-core CPU)."""
    select_alone: bool = True
    """Run the selections first, one at a time, so that each method's cost per window is measured without the
    demo's other jobs on the CPU; then the points' training and evaluation, ``jobs`` at a time."""
    normalize: list[P.Normalize] = field(default_factory=lambda: [P.Normalize.zscore])
    """Normalisations of the probe table (the selections use zscore)."""
    alpha: list[float] = field(default_factory=lambda: [0.5])
    """Alphas of the probe table (the selections use 0.5)."""
    label_key: str = "label"
    """Field of the input records with the probe label (1 = genuine long document)."""
    id_key: str = "id"
    """Field of the input records that windows name as ``source_id``."""
    ruler_length: int = 512
    """RULER length of the Table 1-shaped table (the experiment's ``eval.lengths``)."""
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(enabled=True, group="demo"))
    """The probe and table runs join the points' W&B group (``WANDB_MODE=offline`` works without network)."""
    python: str = ""
    """Interpreter of the points; empty = this one."""


# --- 1. the points ----------------------------------------------------------------------------------------
def point_overrides(cfg: DemoConfig, method: str) -> list[str]:
    return [f"+experiment={cfg.experiment}", f"method={method}", f"root={cfg.root}", *cfg.overrides]


def compose_point(cfg: DemoConfig, method: str | None = None) -> tuple[Any, Any]:
    """(the point's PipelineConfig, its Hydra config) as ``longattn-pipeline`` composes them."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from longattn.common.hydra_app import CONF_DIR, to_dataclass
    from longattn.experiments.pipeline import PipelineConfig
    from longattn.experiments.pipeline import register_configs as register_pipeline

    register_pipeline()
    overrides = point_overrides(cfg, method) if method else [f"+experiment={cfg.experiment}", *cfg.overrides]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            hc = compose("pipeline", overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    hydra_cfg = hc.hydra
    with open_dict(hc):
        del hc["hydra"]
    return to_dataclass(PipelineConfig, hc), hydra_cfg


def experiment_methods(cfg: DemoConfig) -> list[str]:
    """The methods of the experiment's sweep grid (what ``longattn-pipeline -m +experiment=NAME`` runs)."""
    _, hydra_cfg = compose_point(cfg)
    return str((hydra_cfg.sweeper.params or {}).get("method", "")).split(",")


def _echo(method: str, line: str, t0: float) -> None:
    if PROGRESS.search(line):
        text = line.split("] - ", 1)[-1].rstrip()
        print(f"[{time.perf_counter() - t0:6.0f}s] {method:<18} {text}", flush=True)


def _echo_new_lines(path: Path, pos: int, method: str, t0: float) -> int:
    """Echo the complete lines written to ``path`` after byte ``pos``; the new position."""
    with open(path, "rb") as r:
        r.seek(pos)
        chunk = r.read()
    end = chunk.rfind(b"\n") + 1  # a last line without its newline is read next time
    for line in chunk[:end].replace(b"\r", b"\n").split(b"\n"):
        _echo(method, line.decode("utf-8", errors="replace"), t0)
    return pos + end


def run_points(cfg: DemoConfig, methods: list[str], t0: float, *, phase: str, extra: list[str], jobs: int) -> None:
    """Run the points with ``extra`` overrides, ``jobs`` at a time, echoing their progress into the console
    and their whole output into ``root/logs/<method>.<phase>.log``; raise naming the log of a failed one."""
    logs = Path(cfg.root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    waiting, running = list(methods), {}
    try:
        while waiting or running:
            while waiting and len(running) < max(1, jobs):
                m = waiting.pop(0)
                cmd = [cfg.python or sys.executable, "-m", "longattn.cli.pipeline", *point_overrides(cfg, m), *extra]
                f = open(logs / f"{m}.{phase}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed at its end
                running[m] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), f, 0)
                print(f"[{time.perf_counter() - t0:6.0f}s] {m:<18} {phase}: {' '.join(cmd[3:])}", flush=True)
            time.sleep(1.0)
            for m, (proc, f, pos) in list(running.items()):
                running[m] = (proc, f, _echo_new_lines(logs / f"{m}.{phase}.log", pos, m, t0))
                if proc.poll() is None:
                    continue
                f.close()
                running.pop(m)
                if proc.returncode != 0:
                    raise RuntimeError(f"point {m} failed (exit {proc.returncode}); its log: {f.name}")
                print(f"[{time.perf_counter() - t0:6.0f}s] {m:<18} {phase}: done", flush=True)
    finally:
        for proc, f, _ in running.values():  # a failed point stops the demo: end the points it started
            proc.terminate()
            f.close()


def point_dirs(root: str, name: str) -> dict[str, Path]:
    """stage -> out_dir of a finished point (``root/points/<name>.json`` written by ``longattn-pipeline``)."""
    rec = json.loads((Path(root) / "points" / f"{name}.json").read_text(encoding="utf-8"))
    return {s["stage"]: Path(s["out_dir"]) for s in rec["stages"]}


# --- 2. the probe, from the selection's own scores ----------------------------------------------------------
def document_labels(paths: list[str], id_key: str, label_key: str) -> dict[str, int]:
    """source id -> label of the labelled input documents."""
    out = {}
    for rec in iter_records(paths):
        r = rec.record
        if r and r.get(label_key) is not None:
            out[str(r.get(id_key, rec.where))] = int(r[label_key])
    return out


def labelled_scores(select_dir: Path, labels: dict[str, int]) -> list[dict[str, Any]]:
    """Rows of ``scores.jsonl`` with the label of their source document (``source_id`` from the row, else
    from ``windows.jsonl``); windows of unlabelled documents are left out."""
    rows = list(read_jsonl(select_dir / "scores.jsonl"))
    if rows and "source_id" not in rows[0]:
        where = {w["data_id"]: w.get("source_id") for w in read_jsonl(select_dir / "windows.jsonl")}
        rows = [{**r, "source_id": where.get(r["data_id"])} for r in rows]
    return [{**r, "label": labels[str(r["source_id"])]} for r in rows if str(r.get("source_id")) in labels]


def probe_selection(select_dir: Path, labels: dict[str, int], out_dir: Path, tag: str, normalize: list[str],
                    alphas: list[float]) -> dict[str, Any]:
    """``probe.json`` / ``probe.md`` / ``probe.png`` of one selection run, in ``longattn-probe``'s format."""
    metrics = json.loads((select_dir / "metrics.json").read_text(encoding="utf-8"))
    rows = labelled_scores(select_dir, labels)
    res = {"tag": tag, "scorer": metrics["scorer"], "model": metrics["model"],
           "window_length": metrics["window_length"], "seconds_per_window": metrics.get("seconds_per_window"),
           "source": str(select_dir), "results": P.probe_table(rows, normalize, alphas)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "probe.json", res)
    (out_dir / "probe.md").write_text(P.markdown_table([res]) + "\n", encoding="utf-8")
    if rows:
        P.plot_distributions(rows, out_dir / "probe.png", tag, res["results"][0])
    return res


# --- 3. the tables ---------------------------------------------------------------------------------------
def summary_row(label: str, dirs: dict[str, Path], probe: dict[str, Any], length: int) -> dict[str, Any]:
    """One method's numbers for the Table 1-shaped table."""
    m = json.loads((dirs["select"] / "metrics.json").read_text(encoding="utf-8"))
    ev = json.loads((dirs["eval"] / "results.json").read_text(encoding="utf-8")) if "eval" in dirs else {}
    cats = m["categories"].values()
    return {"label": label, "scorer": m["scorer"], "model": m["model"], "window_length": m["window_length"],
            "kept": sum(c["kept"] for c in cats), "windows": sum(c["windows_in"] for c in cats),
            "tokens_kept": sum(c["tokens_out"] for c in cats),
            "niah": T._get(ev, "categories", "ruler", "retrieval", str(length)),
            "auroc": probe["results"][0]["overall"] if probe.get("results") else None,
            "seconds_per_window": m.get("seconds_per_window")}


def train_losses(train_dir: Path) -> list[tuple[int, float]]:
    p = train_dir / "metrics.jsonl"
    return [(r["step"], r["loss"]) for r in read_jsonl(p) if "loss" in r] if p.exists() else []


def plot_demo(rows: list[dict[str, Any]], probes: list[dict[str, Any]], losses: dict[str, list], path: Path) -> None:
    """One figure: probe AUROC per category and method; cost per window; the training loss of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    colour = {r["label"]: f"C{i}" for i, r in enumerate(rows)}
    cats = sorted({k for p in probes for k in p["results"][0]["categories"]}) + ["overall"]
    width = 0.8 / max(1, len(probes))
    for i, (r, p) in enumerate(zip(rows, probes, strict=True)):
        e = p["results"][0]
        vals = [e["categories"].get(k, np.nan) for k in cats[:-1]] + [e["overall"]]
        a.bar(np.arange(len(cats)) + i * width, vals, width, label=r["label"], color=colour[r["label"]])
    a.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    a.set_xticks(np.arange(len(cats)) + width * (len(probes) - 1) / 2, cats)
    a.set_ylim(0, 1)
    a.set_ylabel("AUROC (0.5 = chance)")
    a.set_title(f"probe (real): genuine vs concatenated, {probes[0]['results'][0]['n'] if probes else 0} windows")
    a.legend(fontsize=8)
    spw = [r["seconds_per_window"] or 0 for r in rows]
    bars = b.bar([r["label"] for r in rows], spw, color=[colour[r["label"]] for r in rows])
    b.bar_label(bars, [f"{x:.2g} s" for x in spw], fontsize=8)
    b.set_yscale("log")
    b.set_ylabel("seconds per window (log)")
    b.set_title(f"selection cost per {rows[0]['window_length'] if rows else ''}-token window (real)")
    for r in rows:
        pts = losses.get(r["label"], [])
        niah = "–" if r["niah"] is None else f"{100 * r['niah']:.0f}%"
        c.plot([s for s, _ in pts], [x for _, x in pts], marker="o", color=colour[r["label"]],
               label=f"{r['label']} (RULER-NIAH {niah})")
    c.xaxis.get_major_locator().set_params(integer=True)
    c.set_xlabel("step")
    c.set_ylabel("training loss")
    c.set_title("tiny LLaMA with ABF on each selection (plumbing)")
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(tables: dict[str, T.Table], out: Path, verdict: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        (out / f"{name}.md").write_text(T.to_markdown(t), encoding="utf-8")
        (out / f"{name}.csv").write_text(T.to_csv(t), encoding="utf-8")
    text = "\n".join(T.to_markdown(t) for t in tables.values()) + f"\n{verdict}\n\n![demo](demo.png)\n"
    (out / "tables.md").write_text(text, encoding="utf-8")
    return text


def _log_wandb(cfg: DemoConfig, out: Path, job_type: str, metrics: dict[str, Any],
               tables: dict[str, T.Table] | None = None, image: Path | None = None) -> None:
    """A W&B run of the demo's own steps (probe, tables) in the points' group; always ``metrics.jsonl``."""
    w = dataclasses.replace(cfg.wandb, job_type=job_type, name=f"{cfg.experiment}-{out.name}-{job_type}")
    logger = MetricsLogger(out, w, job_type=job_type, config={"root": cfg.root, "experiment": cfg.experiment})
    logger.log(metrics)
    logger.summary(metrics)
    if logger.run is not None and (tables or image):
        import wandb

        payload: dict[str, Any] = {f"{job_type}/{k}": wandb.Table(columns=t.columns, data=[[T._fmt(x) for x in r]
                                                                                            for r in t.rows])
                                   for k, t in (tables or {}).items()}
        if image is not None and image.exists():
            payload[f"{job_type}/figure"] = wandb.Image(str(image))
        logger.run.log(payload)
    logger.close()


def run_demo(cfg: DemoConfig) -> str:
    """Run the whole demo; returns the Markdown of its tables (also in ``root/tables/tables.md``)."""
    t0 = time.perf_counter()
    methods = cfg.methods or experiment_methods(cfg)
    print(f"demo: {len(methods)} methods ({', '.join(methods)}), {cfg.jobs} at a time; logs in {cfg.root}/logs",
          flush=True)
    if cfg.select_alone:  # each selection alone on the CPU: its cost per window is not shared with the others
        run_points(cfg, methods, t0, phase="select", extra=["train.enabled=false", "eval.enabled=false"], jobs=1)
    run_points(cfg, methods, t0, phase="train+eval" if cfg.select_alone else "all", extra=[], jobs=cfg.jobs)
    points = _points(cfg, methods)
    labels = document_labels(points[0]["data"], cfg.id_key, cfg.label_key)
    probes, rows, losses = [], [], {}
    for p in points:
        tag = f"{p['label']}/{json.loads((p['dirs']['select'] / 'metrics.json').read_text())['model']}"
        res = probe_selection(p["dirs"]["select"], labels, Path(cfg.root) / "probe" / p["method"], tag,
                              [str(n) for n in cfg.normalize], [float(a) for a in cfg.alpha])
        _log_wandb(cfg, Path(cfg.root) / "probe" / p["method"], "probe",
                   {f"probe/{k}": v for k, v in res["results"][0]["categories"].items()}
                   | {"probe/overall": res["results"][0]["overall"]})
        probes.append(res)
        rows.append(summary_row(p["label"], p["dirs"], res, cfg.ruler_length))
        if "train" in p["dirs"]:
            losses[p["label"]] = train_losses(p["dirs"]["train"])
    sel = T.find_metrics([p["dirs"]["select"] for p in points])
    tables = {"table1_demo": T.demo_table1(rows, cfg.ruler_length), "table5": T.table5(sel),
              "probe": T.probe_table(probes), "table10": T.table10(sel, paper=False)}
    out = Path(cfg.root) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    plot_demo(rows, probes, losses, out / "demo.png")
    n_cat = probes[0]["results"][0]["n"] / max(1, len(probes[0]["results"][0]["categories"])) if probes else 0
    text = write_tables(tables, out, real_vs_plumbing(n_cat))
    _log_wandb(cfg, out, "tables", {"demo/seconds": time.perf_counter() - t0}, tables, out / "demo.png")
    print(f"\n[{time.perf_counter() - t0:6.0f}s] demo done: tables and figure in {out}; "
          f"datasets in {cfg.root}/select-*/dataset; W&B offline runs under {cfg.root} (group "
          f"{cfg.wandb.group})\n", flush=True)
    return text


def _points(cfg: DemoConfig, methods: list[str]) -> list[dict[str, Any]]:
    """Name, label, input data and stage directories of each finished point."""
    out = []
    for m in methods:
        pc, _ = compose_point(cfg, m)
        out.append({"method": m, "label": pc.method_label, "data": list(pc.data), "dirs": point_dirs(cfg.root, pc.name)})
    return out


def register_configs() -> None:
    ConfigStore.instance().store(name="demo_schema", node=DemoConfig)
