"""What a selection run tells its user: input repairs and warnings in metrics.json, and the console summary."""

from __future__ import annotations

from typing import Any

from longattn.selection.config import SelectRunConfig
from longattn.selection.records import mapping_text
from longattn.selection.shards import Plan

__all__ = ["input_report", "format_summary", "print_summary"]


def input_report(cfg: SelectRunConfig, pre: dict[str, Any], plan: Plan, metrics: dict[str, Any]) -> dict[str, Any]:
    """Keys to add to metrics.json: ``counts.repaired``, ``category_map``, ``unreadable`` and ``warnings`` —
    every surprise a run can end with (rc 0) stated, so none goes unnoticed."""
    notes = plan.notes if cfg.data.preprocessed else pre
    cmap, unreadable = notes.get("category_map", {}), notes.get("unreadable", [])
    repaired = notes.get("repaired", {})
    warnings = []
    if unreadable:
        warnings.append(f"{len(unreadable)} damaged input file(s) read up to the damage, the rest counted as "
                        f"unreadable: {'; '.join(unreadable[:5])}")
    if cmap:
        warnings.append(f"categories normalised: {mapping_text(cmap)}")
    if repaired.get("decode_errors"):
        warnings.append(f"{repaired['decode_errors']} records held invalid UTF-8 (read with U+FFFD in place of "
                        "the bad bytes)")
    warnings += _empty_warnings(cfg, pre, plan, metrics)
    return {"counts": {**metrics["counts"], "repaired": repaired}, "category_map": cmap, "unreadable": unreadable,
            "warnings": warnings}


def _empty_warnings(cfg: SelectRunConfig, pre: dict[str, Any], plan: Plan, metrics: dict[str, Any]) -> list[str]:
    cats = metrics["categories"]
    records = plan.n_windows + sum(plan.skipped.values()) if cfg.data.preprocessed else pre.get("documents", 0)
    if not records:
        return [f"the inputs hold no records: nothing to select (data.paths={list(cfg.data.paths)})"]
    if not cats:
        skipped = metrics["counts"]["skipped_documents"] or metrics["counts"]["skipped_windows"]
        return [f"no windows to score: all {records} input records were skipped ({skipped}; "
                f"window.length={cfg.window.length})"]
    out = []
    for cat, c in cats.items():
        if c["windows_in"] and not c["kept"]:
            if cfg.select.tokens is not None:
                why = (f"select.tokens={cfg.select.tokens:g} is less than one window of "
                       f"{c['tokens_in'] // c['windows_in']} tokens")
            else:
                why = f"select.fraction={cfg.select.fraction:g} of {c['windows_in']} windows rounds down to 0"
            out.append(f"category {cat}: nothing kept of {c['windows_in']} windows ({why})")
    return out


def format_summary(metrics: dict[str, Any], paths: dict[str, Any]) -> str:
    head = f"{'category':<12} {'windows':>8} {'kept':>6} {'tokens kept':>12} {'mean DS':>9} {'mean Var':>10} {'mean LDS':>9}"
    lines = [head, "-" * len(head)]
    for cat, c in metrics["categories"].items():
        lines.append(
            f"{cat:<12} {c['windows_in']:>8} {c['kept']:>6} {c['tokens_out']:>12} {c['mean_ds']:>9.4f} "
            f"{c['mean_var']:>10.3e} {c['mean_lds']:>9.4f}"
        )
    counts = metrics["counts"]
    lines.append(f"skipped documents: {counts['skipped_documents'] or 'none'}; "
                 f"skipped windows: {counts['skipped_windows'] or 'none'}")
    repaired = {k: v for k, v in counts.get("repaired", {}).items() if v}
    if repaired:
        lines.append(f"repaired while reading: {repaired}")
    rate = metrics["windows_per_second"]
    lines.append(f"scored {metrics['windows']} windows in {metrics['score_seconds']:.1f} s"
                 + (f" ({rate:.2f} windows/s)" if rate else "") + f", model load {metrics['load_seconds']:.1f} s, "
                 f"peak RSS {metrics['peak_rss_mb']:.0f} MB")
    lines.append("outputs:")
    lines += [f"  {name:<16} {p}" for name, p in paths.items()]
    if metrics.get("warnings"):
        lines.append("warnings:")
        lines += [f"  ! {w}" for w in metrics["warnings"]]
    return "\n".join(lines)


def print_summary(result: Any) -> None:
    print(format_summary(result.metrics, result.paths), flush=True)
