"""Console summary of a selection run: per category windows in / kept and mean DS, Var, LDS."""

from __future__ import annotations

from typing import Any


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
    rate = metrics["windows_per_second"]
    lines.append(f"scored {metrics['windows']} windows in {metrics['score_seconds']:.1f} s"
                 + (f" ({rate:.2f} windows/s)" if rate else "") + f", model load {metrics['load_seconds']:.1f} s, "
                 f"peak RSS {metrics['peak_rss_mb']:.0f} MB")
    lines.append("outputs:")
    lines += [f"  {name:<16} {p}" for name, p in paths.items()]
    return "\n".join(lines)


def print_summary(result: Any) -> None:
    print(format_summary(result.metrics, result.paths), flush=True)
