"""From lm-eval's output to the project's results: ``{suite: {task: {length_or_"all": score}}}`` on 0-100,
with the paper's groupings under ``categories``. Pure functions of dicts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from eval.metrics import category_averages, mean
from eval.suites import LONGBENCH_CATEGORIES, LONGBENCH_CATEGORIES_BY_LANGUAGE, RULER_GROUPS


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


def longbench_categories(lb: dict[str, dict[str, float]],
                         groups: dict[str, list[str]] = LONGBENCH_CATEGORIES) -> dict[str, float]:
    """Category means and ``avg``, their mean (as LongBench's own summary). Default: the six categories of
    the paper's Table 3, English and Chinese tasks mixed."""
    cats = category_averages({t: v["all"] for t, v in lb.items()}, groups)
    if cats:
        cats["avg"] = mean(list(cats.values()))
    return cats


def longbench_by_language(lb: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per language as LongBench's README leaderboard: ``en`` and ``zh``, each with the six categories
    (the code tasks count in both) and ``avg``."""
    out = {lang: longbench_categories(lb, groups) for lang, groups in LONGBENCH_CATEGORIES_BY_LANGUAGE.items()}
    return {lang: cats for lang, cats in out.items() if cats}


def categories(results: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "ruler" in results:
        out["ruler"] = ruler_groups(results["ruler"])
    if "longbench" in results:
        out["longbench"] = longbench_categories(results["longbench"])
        out["longbench_by_language"] = longbench_by_language(results["longbench"])
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


def _requests(sample: dict[str, Any]) -> list[list[Any]]:
    """A sample's request arguments, as lm-eval returns them (tuples) or after its tracker has saved them
    (``{"gen_args_0": {"arg_0": ..., "arg_1": ...}}``)."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [list(a.values()) for a in args.values()]
    return [list(a) for a in args]


def sample_rows(leaf: Any, samples: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """The per-sample record a person checks a table number with: the prompt the model received, its
    prediction (generated text; for multiple choice the log-likelihood of each choice), the references
    and the sample's score on 0-100."""
    for s in samples:
        reqs, doc = _requests(s), s.get("doc") or {}
        if leaf.max_gen_toks:
            prediction: Any = s["filtered_resps"][0]
        else:
            prediction = {"choices": [r[1] for r in reqs],
                          "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}
        refs = doc.get("outputs") if "outputs" in doc else doc.get("answers", s.get("target"))
        yield {"task": leaf.task, "column": leaf.key, "lm_eval_task": leaf.name, "doc_id": s.get("doc_id"),
               "prompt": reqs[0][0], "prediction": prediction, "references": refs,
               "score": float(s[leaf.metric]) * leaf.scale if leaf.metric in s else None}
