"""From lm-eval's output to the project's results: ``{suite: {task: {length_or_"all": score}}}`` on 0-100,
with the paper's groupings under ``categories``. Pure functions of dicts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from eval.metrics import category_averages, mean
from eval.suites import LONGBENCH_CATEGORIES, RULER_GROUPS


def collect(leaves: Iterable[Any], lm_results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Scores per suite, task and column; several leaves of one cell (MMLU subjects) are size-weighted."""
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for leaf in leaves:
        row = lm_results.get("results", {}).get(leaf.name)
        if row is None or f"{leaf.metric},none" not in row:
            continue
        n = float(lm_results.get("n-samples", {}).get(leaf.name, {}).get("effective", 1) or 1)
        acc = sums[(leaf.suite, leaf.task, leaf.key)]
        acc[0] += n * float(row[f"{leaf.metric},none"]) * leaf.scale
        acc[1] += n
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (suite, task, key), (total, n) in sums.items():
        out.setdefault(suite, {}).setdefault(task, {})[key] = total / n
    return out


def ruler_groups(ruler: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per group (retrieval = the eight NIAH tasks, vt, aggregation, qa, all) and length: mean over its tasks."""
    lengths = sorted({k for cols in ruler.values() for k in cols}, key=int)
    out: dict[str, dict[str, float]] = {}
    for group, tasks in RULER_GROUPS.items():
        for length in lengths:
            vals = [ruler[t][length] for t in tasks if length in ruler.get(t, {})]
            if vals:
                out.setdefault(group, {})[length] = mean(vals)
    return out


def longbench_categories(lb: dict[str, dict[str, float]]) -> dict[str, float]:
    """The six category means of Table 3 and ``avg``, their mean (as LongBench's own summary)."""
    cats = category_averages({t: v["all"] for t, v in lb.items()}, LONGBENCH_CATEGORIES)
    if cats:
        cats["avg"] = mean(list(cats.values()))
    return cats


def categories(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "ruler" in results:
        out["ruler"] = ruler_groups(results["ruler"])
    if "longbench" in results:
        out["longbench"] = longbench_categories(results["longbench"])
    if "short" in results:
        out["short"] = {"avg": mean([v["all"] for v in results["short"].values()])}
    return out


def flat_metrics(doc: dict[str, Any]) -> dict[str, float]:
    """``suite/task/column`` and ``categories/...`` names for the metrics logger (W&B)."""
    out: dict[str, float] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(node, int | float):
            out[f"eval/{prefix}"] = float(node)

    walk("", {k: v for k, v in doc.items() if k not in ("meta",)})
    return out
