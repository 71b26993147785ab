"""PNG + Markdown report of a LongAttn selection run (per-category DS / Var / LDS distributions)."""

from __future__ import annotations

import heapq
import logging
import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_MAX_LINE = 80
_KEPT_COLOUR, _REJ_COLOUR = "tab:blue", "tab:orange"


@dataclass
class _Cat:
    """Streaming accumulator: compact float arrays for plots, bounded heaps for the top/bottom tables."""

    ds: array = field(default_factory=lambda: array("d"))
    var: array = field(default_factory=lambda: array("d"))
    lds: array = field(default_factory=lambda: array("d"))
    kept: array = field(default_factory=lambda: array("b"))
    tokens_kept: int = 0
    # heap entries: (key, tiebreak, (data_id, lds, ds, var, kept, first_line)); only top_k each are retained
    top: list = field(default_factory=list)
    bottom: list = field(default_factory=list)


def _clean_line(text: str) -> str:
    """Single-line, length-capped, table-safe cell text."""
    text = " ".join(str(text).splitlines()).strip()
    # truncate before escaping so a cut can never split an escape sequence (a lone `\` would eat the `|`)
    if len(text) > _MAX_LINE:
        text = text[: _MAX_LINE - 1] + "…"
    return _escape(text)


def _escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def _enters(heap: list, k: int, key: tuple) -> bool:
    return len(heap) < k or key > heap[0][:2]


def _push(heap: list, k: int, item: tuple) -> None:
    if len(heap) < k:
        heapq.heappush(heap, item)
    else:
        heapq.heapreplace(heap, item)


def _collect(rows: Iterable[dict], top_k: int) -> dict[str, _Cat]:
    cats: dict[str, _Cat] = {}
    for i, r in enumerate(rows):
        c = cats.setdefault(str(r["category"]), _Cat())
        ds, var, lds, kept = float(r["ds"]), float(r["var"]), float(r["lds"]), bool(r["kept"])
        c.ds.append(ds)
        c.var.append(var)
        c.lds.append(lds)
        c.kept.append(kept)
        if kept:
            c.tokens_kept += int(r["n_tokens"])
        if top_k <= 0 or not math.isfinite(lds):  # NaN would poison heap ordering
            continue
        # min-heaps; -i makes the earliest row win ties (the later one is evicted first)
        top_key, bottom_key = (lds, -i), (-lds, -i)
        to_top, to_bottom = _enters(c.top, top_k, top_key), _enters(c.bottom, top_k, bottom_key)
        if (
            to_top or to_bottom
        ):  # build the record (string cleaning) only for the rare rows that enter a table
            rec = (str(r["data_id"]), lds, ds, var, kept, _clean_line(r.get("first_line") or ""))
            if to_top:
                _push(c.top, top_k, (*top_key, rec))
            if to_bottom:
                _push(c.bottom, top_k, (*bottom_key, rec))
    return cats


def _bins(*groups: np.ndarray, n: int = 40) -> np.ndarray:
    """Shared bin edges so kept/rejected overlays are comparable; widen a degenerate (constant) range."""
    vals = np.concatenate([g[np.isfinite(g)] for g in groups]) if groups else np.empty(0)
    if vals.size == 0:
        return np.linspace(0.0, 1.0, n + 1)
    lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        pad = abs(lo) * 0.05 or 1e-12
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, n + 1)


def _plot(cats: dict[str, _Cat], path: Path, title: str) -> None:
    names = sorted(cats)
    fig = Figure(figsize=(15, 3.2 * max(1, len(names)) + 0.6), dpi=100)
    if not names:
        fig.text(0.5, 0.5, "no rows", ha="center", va="center")
    axes = fig.subplots(len(names), 3, squeeze=False) if names else np.empty((0, 3))
    for row, name in zip(axes, names, strict=True):
        c = cats[name]
        kept = np.frombuffer(c.kept, dtype=np.int8).astype(bool)
        n_in, n_kept = kept.size, int(kept.sum())
        for ax, label, arr, sci in (
            (row[0], "DS", c.ds, False),
            (row[1], "Var", c.var, True),
        ):
            v = np.frombuffer(arr, dtype=np.float64)
            edges = _bins(v)
            for sel, lab, col in ((kept, "kept", _KEPT_COLOUR), (~kept, "rejected", _REJ_COLOUR)):
                part = v[sel & np.isfinite(v)]
                if part.size:
                    ax.hist(part, bins=edges, alpha=0.6, color=col, label=f"{lab} ({part.size})")
            ax.legend(fontsize=8)
            ax.set_xlabel(label)
            if sci:  # Var lives around 1e-7..1e-5; plain ticks would read as 0.0000
                ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
            ax.set_title(f"{name}: {label} (in {n_in}, kept {n_kept})", fontsize=10)
        lds = np.frombuffer(c.lds, dtype=np.float64)
        ax = row[2]
        ax.hist(lds[np.isfinite(lds)], bins=_bins(lds), color="tab:gray", alpha=0.8)
        if 0 < n_kept < n_in:
            thr = float(lds[kept].min())
            ax.axvline(thr, color="tab:red", linestyle="--", label=f"threshold {thr:.4f}")
            ax.legend(fontsize=8)
        ax.set_xlabel("LDS")
        ax.set_title(f"{name}: LDS (in {n_in}, kept {n_kept})", fontsize=10)
        row[0].set_ylabel("windows")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _rank_table(recs: list[tuple]) -> list[str]:
    lines = ["| rank | data_id | LDS | DS | Var | kept | first line |", "|---:|---|---:|---:|---:|:---:|---|"]
    for rank, (did, lds, ds, var, kept, line) in enumerate(recs, 1):
        lines.append(
            f"| {rank} | {_escape(did)} | {lds:.4f} | {ds:.4g} | {var:.3e} | {'yes' if kept else 'no'} "
            f"| {line} |"
        )
    return lines


def _markdown(cats: dict[str, _Cat], title: str, top_k: int) -> str:
    out = [
        f"# {title}",
        "",
        "## Summary",
        "",
        "| category | windows | kept | tokens kept | mean DS | mean Var | mean LDS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sorted(cats):
        c = cats[name]
        n_kept = int(np.frombuffer(c.kept, dtype=np.int8).sum())
        means = [float(np.mean(np.frombuffer(a, dtype=np.float64))) for a in (c.ds, c.var, c.lds)]
        out.append(
            f"| {_escape(name)} | {len(c.kept)} | {n_kept} | {c.tokens_kept} | {means[0]:.4g} "
            f"| {means[1]:.3e} | {means[2]:.4f} |"
        )
    out += ["", "Means are over all windows of the category (kept and rejected)."]
    for name in sorted(cats) if top_k > 0 else []:
        c = cats[name]
        top = [rec for _, _, rec in sorted(c.top, reverse=True)]
        bottom = [rec for _, _, rec in sorted(c.bottom, reverse=True)]
        out += [
            "",
            f"## {_escape(name)}",
            "",
            f"### Top {len(top)} by LDS",
            "",
            *_rank_table(top),
            "",
            f"### Bottom {len(bottom)} by LDS",
            "",
            *_rank_table(bottom),
        ]
    return "\n".join(out) + "\n"


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _cost_markdown(cost: dict) -> list[str]:
    """This run's cost next to the paper's Table 5 (hours for 36B tokens = the paper's LongABC-32K-Raw)."""
    s, pre, L = cost["scoring"], cost.get("preprocess"), cost["window_length"]
    out = ["", "## Cost", "",
           "Scoring hours are device time (GPU-hours on a GPU, process-hours on CPU); \"36B tokens\" projects this "
           f"run's rate to the paper's corpus, linearly in tokens (this run: L = {L}; LongAttn's attention grows "
           "faster than linearly in L, so a projection from a shorter window is a lower bound at 32k).", "",
           "| scoring | device | windows | s / window | windows/s | hours per 1B tokens | hours for 36B tokens |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for dev, d in sorted(s["devices"].items()):
        out.append(f"| this run ({d['ranks']} ranks) | {_escape(dev)} | {d['windows']} | {_num(d['seconds_per_window'])} "
                   f"| {_num(d['windows'] / d['seconds'] if d['seconds'] else None)} "
                   f"| {_num(d['device_hours_per_billion_tokens'])} | {_num(d['device_hours_36B_tokens'])} |")
    for r in cost.get("paper_table5", []):
        out.append(f"| {r['method']} {r['model']} (paper Table 5) | {r['device']} | {r['windows']:,} "
                   f"| {_num(r['seconds_per_window'])} | {_num(1 / r['seconds_per_window'])} "
                   f"| {_num(r['device_hours_per_billion_tokens'])} | {_num(r['device_hours_36B_tokens'])} |")
    out += ["", f"All ranks together: {_num(s['windows_per_s'])} windows/s."]
    if pre:
        out += ["", f"Pre-processing: {pre['tokens']:,} tokens on {pre['ranks']} ranks, "
                f"{_num(pre['tokens_per_s_per_core'])} tokens/s per core (CPU time of each rank and its tokeniser "
                f"workers); {_num(pre['core_hours_per_billion_tokens'])} core-hours per 1B tokens, "
                f"{_num(pre['core_hours_36B_tokens'])} core-hours for 36B tokens."]
    out += ["", "| rank | device | shards | windows | windows/s |", "|---:|---|---:|---:|---:|"]
    out += [f"| {r} | {_escape(d['device'])} | {d['shards']} | {d['windows']} | {_num(d['windows_per_s'])} |"
            for r, d in s["per_rank"].items()]
    return out


def write_report(
    rows: Iterable[dict], out_dir: str | Path, *, top_k: int = 5, title: str = "LongAttn selection",
    cost: dict | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/report.png and out_dir/report.md (with a cost section when ``cost`` is given: the
    ``cost`` of metrics.json, ``longattn.selection.cost``); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cats = _collect(rows, top_k)
    png, md = out / "report.png", out / "report.md"
    _plot(cats, png, title)
    text = _markdown(cats, title, top_k)
    if cost:
        text += "\n".join(_cost_markdown(cost)) + "\n"
    md.write_text(text, encoding="utf-8")
    logger.info(
        "report: %d categories, %d windows -> %s, %s",
        len(cats),
        sum(len(c.kept) for c in cats.values()),
        png,
        md,
    )
    return png, md
