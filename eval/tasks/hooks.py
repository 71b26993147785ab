"""lm-eval ``process_results`` hooks of the project's task files: the reference benchmarks' scores (0-100).

lm-eval imports this file by path from the task YAMLs next to it; the scores themselves are the pure
functions of ``eval/metrics.py``. Each record carries what its score needs (metric, task, references).
"""

from __future__ import annotations

import os

from eval.humaneval import passes
from eval.metrics import RULER_METRICS, longbench_score, ruler_postprocess


def ruler_results(doc: dict, results: list[str]) -> dict[str, float]:
    pred = ruler_postprocess(results[0])
    return {"score": RULER_METRICS[doc["metric"]](pred, doc["outputs"])}


def longbench_results(doc: dict, results: list[str]) -> dict[str, float]:
    score = longbench_score(doc["task"], doc["metric"], results[0], doc["answers"], doc.get("all_classes"))
    return {"score": score}


def humaneval_results(doc: dict, results: list[str]) -> dict[str, float]:
    # The run sets the time limit in the environment: hooks get only (doc, results).
    timeout = float(os.environ.get("LONGATTN_HUMANEVAL_TIMEOUT", "10"))
    ok = passes(doc["prompt"], results[0], doc["test"], doc["entry_point"], timeout)
    return {"pass@1": 100.0 * ok}
