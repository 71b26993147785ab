"""Merge: gather every shard's scores, select globally per category, write the outputs and metrics.

The LDS normalisation and the budgets are computed over all shards at once, so a sharded run selects
exactly what a single-process run selects; outputs are written in input order, so they are byte-identical.
``select.overlap=drop`` keeps at most one of any overlapping pair of windows of one document; either way
metrics.json counts the tokens the kept windows repeat. metrics.json ``cost`` is the run's cost dashboard
(``longattn.selection.cost``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from longattn.common.io import atomic_writer, read_jsonl
from longattn.common.memory import peak_rss_mb
from longattn.selection.config import Overlap, SelectRunConfig
from longattn.selection.cost import cost_dashboard, cost_metrics
from longattn.selection.lds import duplicated_tokens, keep_mask, keep_mask_disjoint, lds_scores, threshold
from longattn.selection.shards import Plan
from longattn.selection.sources import iter_all_windows

log = logging.getLogger(__name__)

__all__ = ["shard_path", "merge_outputs", "select_categories", "category_summary", "cost_metrics"]


def shard_path(shards_dir: Path, shard: int, suffix: str = "jsonl") -> Path:
    return shards_dir / f"scores-{shard:05d}.{suffix}"


def _json_line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


def iter_scores(plan: Plan, shards_dir: Path) -> Iterator[dict[str, Any]]:
    for s in range(plan.n_shards):
        yield from read_jsonl(shard_path(shards_dir, s))


def _doc_key(r: dict[str, Any]) -> Hashable | None:
    """The document a window was cut from (its ``source_id`` — the record's id, else its file:line — and its
    length), when its token offsets are known; else None: it overlaps nothing."""
    if r.get("token_start") is None or r.get("token_end") is None or r.get("source_id") is None:
        return None
    return (str(r["source_id"]), r.get("doc_tokens"))


def select_categories(rows: Iterator[dict[str, Any]], cfg: SelectRunConfig) -> dict[str, dict[str, Any]]:
    """Per category: arrays of ids, DS, Var, tokens, LDS, the kept mask (``select.overlap`` applied), the
    windows skipped for overlapping a better one, the tokens the kept windows repeat and the LDS threshold."""
    cols: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        c = cols[r["category"]]
        for key in ("data_id", "ds", "var", "n_tokens"):
            c[key].append(r[key])
        c["doc"].append(_doc_key(r))
        c["start"].append(r.get("token_start"))
        c["end"].append(r.get("token_end"))
    s = cfg.select
    out: dict[str, dict[str, Any]] = {}
    for cat, c in cols.items():
        ds, var, ntok = np.array(c["ds"], dtype=float), np.array(c["var"], dtype=float), np.array(c["n_tokens"])
        lds = lds_scores(ds, var, alpha=s.alpha, method=s.normalize)
        if s.overlap == Overlap.drop:
            keep, overlapped = keep_mask_disjoint(lds, ntok, c["doc"], c["start"], c["end"], fraction=s.fraction,
                                                  tokens=s.tokens)
        else:
            keep, overlapped = keep_mask(lds, ntok, fraction=s.fraction, tokens=s.tokens), np.zeros(len(lds), bool)
        out[cat] = {"ids": c["data_id"], "ds": ds, "var": var, "n_tokens": ntok, "lds": lds, "keep": keep,
                    "overlapped": overlapped, "threshold": threshold(lds, keep),
                    "duplicated_tokens": duplicated_tokens(c["doc"], c["start"], c["end"], keep),
                    "without_offsets": sum(d is None for d in c["doc"])}
    return out


def _positions(sel: dict[str, dict[str, Any]]) -> dict[str, tuple[str, int]]:
    return {did: (cat, i) for cat, a in sel.items() for i, did in enumerate(a["ids"])}


def _write_scores(plan: Plan, shards_dir: Path, out_dir: Path, sel: dict[str, dict[str, Any]],
                  pos: dict[str, tuple[str, int]]) -> None:
    with atomic_writer(out_dir / "scores.jsonl") as f:
        for r in iter_scores(plan, shards_dir):
            cat, i = pos[r["data_id"]]
            f.write(_json_line({**r, "lds": float(sel[cat]["lds"][i]), "kept": bool(sel[cat]["keep"][i])}))


def _write_selection(cfg: SelectRunConfig, plan: Plan, out_dir: Path, sel: dict[str, dict[str, Any]],
                     pos: dict[str, tuple[str, int]], wanted: set[str]) -> tuple[Counter, dict[str, str]]:
    """selected.jsonl (reference format + category) and rejected.jsonl (with reason and scores); for windows
    pre-processed by this stage also windows.jsonl, in the same pass (the windows live in pieces until now)."""
    first_lines: dict[str, str] = {}
    n_rej: Counter = Counter()
    with contextlib.ExitStack() as stack:
        fs = stack.enter_context(atomic_writer(out_dir / "selected.jsonl"))
        fr = stack.enter_context(atomic_writer(out_dir / "rejected.jsonl"))
        fw = stack.enter_context(atomic_writer(out_dir / "windows.jsonl")) if plan.kind == "pieces" else None
        for w in iter_all_windows(plan, cfg.data):
            if fw is not None:
                fw.write(_json_line(w))
            cat, i = pos[w["data_id"]]
            a = sel[cat]
            if w["data_id"] in wanted:
                first_lines[w["data_id"]] = w["content"].lstrip().split("\n", 1)[0][:200]
            if a["keep"][i]:
                fs.write(_json_line({"content": w["content"], "data_id": w["data_id"], "category": cat}))
                continue
            reason = "overlap" if a["overlapped"][i] else "below_threshold"
            n_rej[reason] += 1
            if cfg.select.write_rejected:
                fr.write(_json_line({"content": w["content"], "data_id": w["data_id"], "category": cat,
                                     "reason": reason, "lds": float(a["lds"][i]),
                                     "ds": float(a["ds"][i]), "var": float(a["var"][i])}))
    return n_rej, first_lines


def _report_ids(sel: dict[str, dict[str, Any]], k: int) -> set[str]:
    ids: set[str] = set()
    for a in sel.values():
        order = np.argsort(-a["lds"], kind="stable")
        ids.update(a["ids"][j] for j in np.concatenate([order[:k], order[-k:]]))
    return ids


def category_summary(sel: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for cat, a in sorted(sel.items()):
        keep = a["keep"]
        out[cat] = {
            "windows_in": int(keep.size), "kept": int(keep.sum()),
            "tokens_in": int(a["n_tokens"].sum()), "tokens_out": int(a["n_tokens"][keep].sum()),
            "mean_ds": float(a["ds"].mean()), "mean_var": float(a["var"].mean()),
            "mean_lds": float(a["lds"].mean()), "threshold_lds": a["threshold"],
            "min_ds": float(a["ds"].min()), "max_ds": float(a["ds"].max()),
            "min_var": float(a["var"].min()), "max_var": float(a["var"].max()),
            "duplicated_tokens": a["duplicated_tokens"], "rejected_overlap": int(a["overlapped"].sum()),
        }
    return out


def _report(cfg: SelectRunConfig, out_dir: Path, sel: dict[str, dict[str, Any]], first_lines: dict[str, str],
            cost: dict[str, Any]) -> None:
    from longattn.selection.report import write_report

    def rows() -> Iterator[dict[str, Any]]:
        for cat, a in sel.items():
            for i, did in enumerate(a["ids"]):
                yield {"data_id": did, "category": cat, "ds": a["ds"][i], "var": a["var"][i], "lds": a["lds"][i],
                       "kept": bool(a["keep"][i]), "n_tokens": int(a["n_tokens"][i]),
                       "first_line": first_lines.get(did, "")}

    write_report(rows(), out_dir, top_k=cfg.report.top_k, title=f"{cfg.scorer.name} selection — {cfg.model.name}",
                 cost=cost)


def _timing(plan: Plan, shards_dir: Path) -> dict[str, Any]:
    """Scoring cost summed over shards (process-seconds), model loading as the slowest rank's."""
    t: dict[str, Any] = {"score_seconds": 0.0, "windows": 0, "load_seconds": 0.0, "peak_rss_mb": 0.0,
                         "devices": [], "shards": [], "ranks": {}}
    for s in range(plan.n_shards):
        p = shard_path(shards_dir, s, "timing.json")
        if p.exists():
            d = json.loads(p.read_text())
            t["score_seconds"] += d["score_seconds"]
            t["windows"] += d["windows"]
            t["shards"].append(d)
    for p in sorted(shards_dir.glob("rank-*.json")):
        d = json.loads(p.read_text())
        t["load_seconds"] = max(t["load_seconds"], d.get("load_seconds", 0.0))
        t["peak_rss_mb"] = max(t["peak_rss_mb"], d.get("peak_rss_mb", 0.0))
        t["devices"].append(d.get("device"))
        t["ranks"][str(int(p.stem.split("-")[1]))] = d
    return t


def merge_outputs(cfg: SelectRunConfig, plan: Plan, out_dir: Path, shards_dir: Path,
                  pre: dict[str, Any]) -> dict[str, Any]:
    """Select over all shards, write scores / selected / rejected / report / metrics; return the metrics."""
    sel = select_categories(iter_scores(plan, shards_dir), cfg)
    pos = _positions(sel)
    _write_scores(plan, shards_dir, out_dir, sel, pos)
    n_rej, first_lines = _write_selection(cfg, plan, out_dir, sel, pos, _report_ids(sel, cfg.report.top_k))
    if not cfg.select.write_rejected:
        (out_dir / "rejected.jsonl").unlink()
    timing = _timing(plan, shards_dir)
    cost = cost_dashboard(timing["shards"], timing["ranks"], pre, cfg.window.length)
    if cfg.report.enabled and sel:
        _report(cfg, out_dir, sel, first_lines, cost)
    return {**_metrics(cfg, pre, plan, sel, n_rej, timing), "cost": cost}


def _metrics(cfg: SelectRunConfig, pre: dict[str, Any], plan: Plan, sel: dict[str, dict[str, Any]],
             n_rejected: Counter, timing: dict[str, Any]) -> dict[str, Any]:
    cats = category_summary(sel)
    counts = {
        "kept": sum(c["kept"] for c in cats.values()),
        "rejected": {"below_threshold": n_rejected["below_threshold"],
                     **({"overlap": n_rejected["overlap"]} if n_rejected["overlap"] else {})},
        "skipped_windows": dict(plan.skipped),
        "skipped_documents": pre.get("skipped", {}),
    }
    sec = timing["score_seconds"]
    rss_here = peak_rss_mb()  # this process and its children (tokeniser workers)
    return {
        "model": cfg.model.name, "scorer": cfg.scorer.name, "window_length": cfg.window.length,
        "normalize": cfg.select.normalize, "alpha": cfg.select.alpha,
        "overlap": {"policy": cfg.select.overlap, "duplicated_tokens": sum(c["duplicated_tokens"] for c in cats.values()),
                    "tokens_kept": sum(c["tokens_out"] for c in cats.values()),
                    "windows_without_offsets": sum(a["without_offsets"] for a in sel.values())},
        "counts": counts, "categories": cats, "preprocess": pre,
        "load_seconds": timing["load_seconds"], "score_seconds": sec,
        "preprocess_seconds": pre.get("seconds", 0.0), "windows": int(timing["windows"]),
        "windows_per_second": timing["windows"] / sec if sec else None,
        "seconds_per_window": sec / timing["windows"] if timing["windows"] else None,
        "devices": sorted({d for d in timing["devices"] if d}),
        "shards": plan.n_shards,
        "peak_rss_mb": max(rss_here, timing["peak_rss_mb"]),
        "extra": dict(cfg.extra),
    }
