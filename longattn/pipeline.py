"""The selection stage end to end: pre-process -> score (journaled, resumable) -> select -> write.

Every input window ends up kept (``selected.jsonl``), rejected with its reason (``rejected.jsonl``) or
counted as skipped (``metrics.json``); reruns with the same ``out_dir`` skip finished work.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from longattn.config import SelectRunConfig
from longattn.io import JsonlAppender, atomic_writer, iter_records, read_jsonl, write_json
from longattn.selection import keep_mask, lds_scores, threshold

log = logging.getLogger(__name__)

__all__ = ["run_select", "SelectResult"]


@dataclass
class SelectResult:
    out_dir: Path
    metrics: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


def _json_line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"


# --- the windows to score ---------------------------------------------------------------------------
def iter_windows(cfg: SelectRunConfig, out_dir: Path, skipped: Counter) -> Iterator[dict[str, Any]]:
    """Windows in input order: from ``windows.jsonl``, or from reference-format inputs as given."""
    if not cfg.data.preprocessed:
        yield from read_jsonl(out_dir / "windows.jsonl")
        return
    seen: set[str] = set()
    for rec in iter_records(list(cfg.data.paths)):
        r = rec.record
        if r is None or not isinstance(r.get(cfg.data.text_key), str) or not r.get("data_id"):
            why = rec.error or f"needs a string {cfg.data.text_key!r} and a 'data_id'"
            log.warning("skipping malformed window %s: %s", rec.where, why)
            skipped["malformed"] += 1
            continue
        did = str(r["data_id"])
        if did in seen:
            log.warning("skipping duplicate data_id %s at %s", did, rec.where)
            skipped["duplicate_id"] += 1
            continue
        seen.add(did)
        if not r[cfg.data.text_key].strip():
            skipped["empty"] += 1
            continue
        yield {**r, "data_id": did, "content": r[cfg.data.text_key],
               "category": str(r.get("category") or cfg.data.category)}


# --- scoring ----------------------------------------------------------------------------------------
def _score_all(cfg: SelectRunConfig, out_dir: Path, timing: dict[str, float]) -> Counter:
    from longattn.scorers import build_scorer

    skipped: Counter = Counter()
    journal = JsonlAppender(out_dir / "scores.partial.jsonl")
    # Timing survives restarts, so metrics.json of a resumed run still reports the whole scoring cost.
    clock = out_dir / "scores.partial.timing.json"
    if clock.exists() and journal.done:
        for key, val in json.loads(clock.read_text()).items():
            timing[key] += val
    scorer = None
    batch: list[dict[str, Any]] = []
    bar = tqdm(desc="score", unit="win", mininterval=2.0, disable=None)

    def flush() -> None:
        t0 = time.perf_counter()
        rows = scorer.score(batch)
        timing["score_seconds"] += time.perf_counter() - t0
        timing["windows"] += len(rows)
        journal.write_many(rows)
        write_json(clock, {k: timing[k] for k in ("score_seconds", "windows", "load_seconds")})
        bar.update(len(rows))
        batch.clear()

    for w in iter_windows(cfg, out_dir, skipped):
        if w["data_id"] in journal.done:
            continue
        if scorer is None:  # lazily, so a finished run resumes without loading the model
            scorer = build_scorer(cfg.scorer, cfg.model, cfg.window.length)
            timing["load_seconds"] += scorer.load_seconds
        batch.append(w)
        if len(batch) >= cfg.scorer.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    journal.close()
    return skipped


def check_fingerprint(out_dir: Path, name: str, fields: dict[str, Any]) -> None:
    """Refuse to resume from outputs made with a different config (they would be silently mixed)."""
    path = out_dir / f"{name}.fingerprint.json"
    fields = json.loads(json.dumps(fields, default=str))
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fields.items() if old.get(k) != v]
        if diff:
            raise RuntimeError(
                f"out_dir={out_dir} holds {name} outputs made with another config ({'; '.join(diff)}): "
                f"use a new out_dir, or delete {path.parent / name}* to redo them")
    else:
        write_json(path, fields)


def _fingerprints(cfg: SelectRunConfig, out_dir: Path) -> None:
    from dataclasses import asdict

    data = {"data.paths": list(cfg.data.paths), "data.preprocessed": cfg.data.preprocessed,
            "data.text_key": cfg.data.text_key, "data.category": cfg.data.category}
    window = {f"window.{k}": v for k, v in asdict(cfg.window).items() if k not in ("workers", "batch_docs")}
    model = {f"model.{k}": v for k, v in asdict(cfg.model).items() if k != "device"}
    scorer = {f"scorer.{k}": v for k, v in asdict(cfg.scorer).items() if k not in ("batch_size", "backend")}
    if not cfg.data.preprocessed:
        check_fingerprint(out_dir, "windows", {**data, **window, "tokenizer": model["model.tokenizer"] or
                                               model["model.path"] or model["model.gguf_file"]})
    check_fingerprint(out_dir, "scores", {**data, "window.length": cfg.window.length, **model, **scorer})


# --- selection --------------------------------------------------------------------------------------
def _select(cfg: SelectRunConfig, out_dir: Path, valid_ids: set[str]) -> dict[str, dict[str, Any]]:
    """Per category: LDS of every scored window and the kept mask. Returns {category: arrays}."""
    cols: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in read_jsonl(out_dir / "scores.partial.jsonl"):
        if r["data_id"] in valid_ids:
            c = cols[r["category"]]
            for key in ("data_id", "ds", "var", "n_tokens"):
                c[key].append(r[key])
    out: dict[str, dict[str, Any]] = {}
    s = cfg.select
    for cat, c in cols.items():
        ds, var, ntok = np.array(c["ds"]), np.array(c["var"]), np.array(c["n_tokens"])
        lds = lds_scores(ds, var, alpha=s.alpha, method=s.normalize)
        keep = keep_mask(lds, ntok, fraction=s.fraction, tokens=s.tokens)
        out[cat] = {"ids": c["data_id"], "ds": ds, "var": var, "n_tokens": ntok, "lds": lds, "keep": keep,
                    "threshold": threshold(lds, keep)}
    return out


def _write_outputs(cfg: SelectRunConfig, out_dir: Path, sel: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """scores.jsonl (journal + lds, input order), selected.jsonl and rejected.jsonl (second pass)."""
    index = {did: (cat, i) for cat, a in sel.items() for i, did in enumerate(a["ids"])}
    with atomic_writer(out_dir / "scores.jsonl") as f:
        for r in read_jsonl(out_dir / "scores.partial.jsonl"):
            if r["data_id"] in index:
                cat, i = index.pop(r["data_id"])
                f.write(_json_line({**r, "lds": float(sel[cat]["lds"][i]), "kept": bool(sel[cat]["keep"][i])}))
    first_lines: dict[str, str] = {}
    wanted = _report_ids(sel, cfg.report.top_k)
    n_rej = 0
    rej_path = out_dir / "rejected.jsonl"
    with atomic_writer(out_dir / "selected.jsonl") as fs, atomic_writer(rej_path) as fr:
        pos = {did: (cat, i) for cat, a in sel.items() for i, did in enumerate(a["ids"])}
        for w in iter_windows(cfg, out_dir, Counter()):
            if w["data_id"] not in pos:
                continue
            cat, i = pos.pop(w["data_id"])
            a = sel[cat]
            if w["data_id"] in wanted:
                first_lines[w["data_id"]] = w["content"].lstrip().split("\n", 1)[0][:200]
            if a["keep"][i]:
                fs.write(_json_line({"content": w["content"], "data_id": w["data_id"], "category": cat}))
            else:
                n_rej += 1
                if cfg.select.write_rejected:
                    fr.write(_json_line({"content": w["content"], "data_id": w["data_id"], "category": cat,
                                         "reason": "below_threshold", "lds": float(a["lds"][i]),
                                         "ds": float(a["ds"][i]), "var": float(a["var"][i])}))
    if not cfg.select.write_rejected:
        rej_path.unlink()
    return {"first_lines": first_lines, "rejected": n_rej}


def _report_ids(sel: dict[str, dict[str, Any]], k: int) -> set[str]:
    ids: set[str] = set()
    for a in sel.values():
        order = np.argsort(-a["lds"], kind="stable")
        ids.update(a["ids"][j] for j in np.concatenate([order[:k], order[-k:]]))
    return ids


def _category_summary(sel: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
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
        }
    return out


def _report(cfg: SelectRunConfig, out_dir: Path, sel: dict[str, dict[str, Any]], first_lines: dict[str, str]) -> None:
    from longattn.report import write_report

    def rows() -> Iterator[dict[str, Any]]:
        for cat, a in sel.items():
            for i, did in enumerate(a["ids"]):
                yield {"data_id": did, "category": cat, "ds": a["ds"][i], "var": a["var"][i], "lds": a["lds"][i],
                       "kept": bool(a["keep"][i]), "n_tokens": int(a["n_tokens"][i]),
                       "first_line": first_lines.get(did, "")}

    write_report(rows(), out_dir, top_k=cfg.report.top_k, title=f"LongAttn selection — {cfg.model.name}")


# --- the stage --------------------------------------------------------------------------------------
def run_select(cfg: SelectRunConfig, tokenizer_factory: Any = None) -> SelectResult:
    """Run (or resume) the selection stage into ``cfg.out_dir``."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing = {"load_seconds": 0.0, "score_seconds": 0.0, "windows": 0, "preprocess_seconds": 0.0}
    _fingerprints(cfg, out_dir)
    pre = _preprocess_once(cfg, out_dir, timing)
    skipped = _score_all(cfg, out_dir, timing)
    valid = {w["data_id"] for w in iter_windows(cfg, out_dir, Counter())}
    sel = _select(cfg, out_dir, valid)
    written = _write_outputs(cfg, out_dir, sel)
    if cfg.report.enabled and sel:
        _report(cfg, out_dir, sel, written["first_lines"])
    metrics = _metrics(cfg, pre, skipped, sel, written, timing)
    write_json(out_dir / "metrics.json", metrics)
    names = ["windows.jsonl", "scores.jsonl", "selected.jsonl", "rejected.jsonl", "metrics.json",
             "report.png", "report.md"]
    paths = {n: out_dir / n for n in names if (out_dir / n).exists()}
    return SelectResult(out_dir, metrics, paths)


def _preprocess_once(cfg: SelectRunConfig, out_dir: Path, timing: dict[str, float]) -> dict[str, Any]:
    if cfg.data.preprocessed:
        return {}
    marker = out_dir / "preprocess.json"
    if marker.exists() and (out_dir / "windows.jsonl").exists():
        log.info("pre-processing already done (%s): skipping", marker)
        return json.loads(marker.read_text())
    from longattn.model import load_tokenizer
    from longattn.windows import preprocess

    t0 = time.perf_counter()
    stats = preprocess(cfg.data, cfg.window, load_tokenizer(cfg.model), out_dir)
    timing["preprocess_seconds"] = time.perf_counter() - t0
    return stats.to_dict()


def _metrics(cfg: SelectRunConfig, pre: dict[str, Any], skipped: Counter, sel: dict[str, dict[str, Any]],
             written: dict[str, Any], timing: dict[str, float]) -> dict[str, Any]:
    cats = _category_summary(sel)
    counts = {
        "kept": sum(c["kept"] for c in cats.values()),
        "rejected": {"below_threshold": written["rejected"]},
        "skipped_windows": dict(skipped),
        "skipped_documents": pre.get("skipped", {}),
    }
    rate = timing["windows"] / timing["score_seconds"] if timing["score_seconds"] else None
    return {
        "model": cfg.model.name, "scorer": cfg.scorer.name, "window_length": cfg.window.length,
        "normalize": cfg.select.normalize, "alpha": cfg.select.alpha,
        "counts": counts, "categories": cats, "preprocess": pre,
        "load_seconds": timing["load_seconds"], "score_seconds": timing["score_seconds"],
        "preprocess_seconds": timing["preprocess_seconds"], "windows": int(timing["windows"]),
        "windows_per_second": rate,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "extra": dict(cfg.extra),
    }
