"""One evaluation run: prepare data → write task files → evaluate every suite with one loaded model →
results.json (+ lm-eval's outputs under out_dir/lm_eval, metrics.jsonl, W&B)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from eval.config import EvalRunConfig, model_name
from eval.prepare import LeafTask, prepare
from eval.results import categories, collect, flat_metrics
from longattn.common.distributed import build_once, env_rank
from longattn.common.io import write_json
from longattn.common.tracking import MetricsLogger

log = logging.getLogger(__name__)


def _shot_groups(run: EvalRunConfig, leaves: list[LeafTask]) -> dict[int | None, list[LeafTask]]:
    """Leaves by few-shot count (lm-eval takes one count per call): short tasks as configured, else 0."""
    shots = run.suite["short"].num_fewshot if "short" in run.suite else {}
    groups: dict[int | None, list[LeafTask]] = {}
    for leaf in leaves:
        n = shots.get(leaf.task) if leaf.suite == "short" and leaf.task != "humaneval" else None
        groups.setdefault(n, []).append(leaf)
    return groups


# lm-eval puts RULER's answer prefix (gen_prefix, up to ~60 tokens with UUID keys) after a prompt already
# sized to the length; the reference counts it inside. Headroom keeps the whole prompt instead of letting
# the backend cut its first tokens (the instructions) from the left.
RULER_PREFIX_HEADROOM = 64


def backend_max_length(run: EvalRunConfig) -> int:
    if "ruler" not in run.suite:
        return run.model.max_length
    return max(run.model.max_length, max(run.eval.lengths) + RULER_PREFIX_HEADROOM)


def evaluate_all(run: EvalRunConfig, leaves: list[LeafTask], out: Path) -> dict[str, Any]:
    """lm-eval over all leaves, the model loaded once; merged lm-eval results."""
    from eval import harness

    if "short" in run.suite:
        os.environ["LONGATTN_HUMANEVAL_TIMEOUT"] = str(run.suite["short"].humaneval_timeout)
    lm = harness.build_lm(replace(run.model, max_length=backend_max_length(run)), run.eval)
    merged: dict[str, Any] = {"results": {}, "n-samples": {}}
    for shots, group in _shot_groups(run, leaves).items():
        res = harness.evaluate(lm, [leaf.name for leaf in group], out / "tasks", out, run.eval, shots)
        for key in merged:
            merged[key].update(res.get(key, {}))
    return merged


def prepare_once(run: EvalRunConfig, out: Path, wait_s: float = 4 * 3600) -> list[LeafTask]:
    """Rank 0 prepares; under ``accelerate launch`` the other ranks wait for its marker (keyed by the run's
    config, so an earlier run's marker is never taken for this one) instead of generating the same RULER files
    N times."""
    key = hashlib.sha256(json.dumps(asdict(run), sort_keys=True, default=str).encode()).hexdigest()
    rank, _ = env_rank()
    leaves = build_once(out / "tasks" / ".prepared.json", key,
                        lambda: [asdict(leaf) for leaf in prepare(run, out / "tasks")], rank=rank, timeout_s=wait_s)
    return [LeafTask(**d) for d in leaves]


def run_eval(run: EvalRunConfig) -> dict[str, Any] | None:
    out = Path(run.out_dir)
    t0 = time.time()
    leaves = prepare_once(run, out)
    log.info("prepared %d lm-eval tasks in %.1fs", len(leaves), time.time() - t0)
    if run.eval.prepare_only:
        return None
    lm_results = evaluate_all(run, leaves, out)
    if not lm_results["results"]:  # a non-zero rank under accelerate: rank 0 writes
        return None
    scores = collect(leaves, lm_results)
    doc = {**scores, "categories": categories(scores),
           "meta": {"model": model_name(run), "model_path": run.model.path, "label": asdict(run.label), "extra": dict(run.extra),
                    "seconds": time.time() - t0, "config": asdict(run)}}
    # results.json is the stage's completion marker: written atomically, last.
    write_json(out / "results.json", json.loads(json.dumps(doc, default=str)))
    logger = MetricsLogger(out, run.wandb, job_type="eval", config=asdict(run))
    logger.log(flat_metrics(doc))
    logger.summary(flat_metrics(doc))
    logger.artifact(out / "results.json", f"results-{model_name(run)}", "eval_results")
    logger.close()
    return doc
