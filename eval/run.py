"""One evaluation run: prepare data → write task files → evaluate every suite with one loaded model →
results.json, per-sample files under out_dir/samples, lm-eval's outputs under out_dir/lm_eval,
metrics.jsonl and W&B."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from eval.cache import fingerprint, tokenizer_fingerprint, versions
from eval.config import EvalRunConfig, model_name, selected_tasks
from eval.prepare import LeafTask, prepare, prepare_command
from eval.results import categories, collect, flat_metrics, sample_rows
from longattn.common.distributed import build_once, env_rank, wait_for
from longattn.common.io import json_digest, write_json
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


def backend_max_length(run: EvalRunConfig, leaves: list[LeafTask]) -> int:
    """Room for the longest prompt of every task plus its generation, and at least ``model.max_length``.

    lm-eval's backends cut a longer prompt from the left (dropping BOS and the instructions); the reference
    benchmarks never do. RULER prompts reach the target length and FWE's go up to 50 tokens past it as in
    the reference; LongBench prompts are already truncated to the budget."""
    need = max((leaf.max_tokens + leaf.max_gen_toks for leaf in leaves if leaf.max_gen_toks), default=0)
    return max(run.model.max_length, need)


def _local_sources(run: EvalRunConfig) -> dict[str, Any]:
    """Fingerprints of the local files the config names (a changed file gives a new marker key)."""
    files: dict[str, Any] = {}
    if "ruler" in run.suite:
        cfg = run.suite["ruler"]
        for key in ("haystack", "squad", "hotpotqa"):
            if getattr(cfg, key):
                files[f"suite.ruler.{key}"] = fingerprint(getattr(cfg, key))
    for suite in ("longbench", "short"):
        data_dir = run.suite[suite].data_dir if suite in run.suite else None
        if data_dir:
            for f in sorted(Path(os.path.expanduser(data_dir)).rglob("*.json*")):
                files[f"suite.{suite}.data_dir/{f.relative_to(Path(os.path.expanduser(data_dir)))}"] = fingerprint(f)
    return files


def prepare_key(run: EvalRunConfig) -> str:
    """What the prepared task files depend on: the config, the tokenizer, local sources, versions and the
    sentence-split mode. Hub sources enter by name (their cached copies are keyed by content in eval/cache.py)."""
    key: dict[str, Any] = {"run": asdict(run), "sources": _local_sources(run), "versions": versions()}
    if {"ruler", "longbench"} & set(run.suite):
        key["tokenizer"] = tokenizer_fingerprint(run.model.tokenizer or run.model.path)
    if "ruler" in run.suite:
        from eval import ruler

        key["punkt"] = ruler.punkt_available()
    return json_digest(key, 64)


def _data_files(task_dir: Path, leaves: list[LeafTask]) -> list[Path]:
    files = []
    for leaf in leaves:
        leaf_file = task_dir / f"{leaf.name}.yaml"
        if leaf.name.startswith("longattn_"):
            files.append(leaf_file)
            if leaf_file.exists():
                spec = yaml.safe_load(leaf_file.read_text(encoding="utf-8"))
                files += [Path(p) for p in (spec.get("dataset_kwargs") or {}).get("data_files", {}).values()]
    return files


def prepare_once(run: EvalRunConfig, out: Path, wait_s: float = 4 * 3600) -> list[LeafTask]:
    """Rank 0 prepares; under ``accelerate launch`` the other ranks wait for its marker, keyed by what the
    data depends on (``prepare_key``), so an earlier run's marker is never taken for this one."""
    task_dir, rank = out / "tasks", env_rank()[0]
    marker, key = task_dir / ".prepared.json", prepare_key(run)

    def build() -> list[dict[str, Any]]:
        return [asdict(leaf) for leaf in prepare(run, task_dir)]

    leaves = [LeafTask(**d) for d in build_once(marker, key, build, rank=rank, timeout_s=wait_s)]
    missing = [p for p in _data_files(task_dir, leaves) if not p.exists()]
    if missing and rank == 0:  # the marker outlived its files (cache cleared): make them again
        log.info("%d prepared files are gone (e.g. %s): preparing again", len(missing), missing[0])
        leaves = [LeafTask(**d) for d in build()]
        write_json(marker, {"key": key, "value": [asdict(leaf) for leaf in leaves]})
    elif missing:
        wait_for(lambda: all(p.exists() for p in missing), "rank 0 to prepare the data again", timeout_s=wait_s)
    return leaves


def write_samples(out: Path, leaf: LeafTask, samples: list[dict[str, Any]]) -> None:
    """``out/samples/<task>.jsonl``: prompt, prediction, references and score of every sample, appended per
    lm-eval task (RULER lengths and MMLU subjects share their task's file)."""
    path = out / "samples" / f"{leaf.task}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in sample_rows(leaf, samples):
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def evaluate_all(run: EvalRunConfig, leaves: list[LeafTask], out: Path, max_length: int) -> dict[str, Any]:
    """lm-eval over all leaves, the model loaded once; merged lm-eval results."""
    from eval import harness

    if "short" in run.suite:
        os.environ["LONGATTN_HUMANEVAL_TIMEOUT"] = str(run.suite["short"].humaneval_timeout)
    lm = harness.build_lm(replace(run.model, max_length=max_length), run.eval)
    hub = [leaf.name for leaf in leaves if not leaf.name.startswith("longattn_")]
    manager = harness.task_manager(out / "tasks", builtin=bool(hub))
    by_name = {leaf.name: leaf for leaf in leaves}
    if env_rank()[0] == 0:  # rank 0 writes the per-sample files, appending: start from none
        for old in (out / "samples").glob("*.jsonl"):
            old.unlink()
    merged: dict[str, Any] = {"results": {}, "n-samples": {}}
    for shots, group in _shot_groups(run, leaves).items():
        names = [leaf.name for leaf in group]
        res = harness.evaluate(lm, names, manager, out, run.eval, shots, [n for n in names if n in hub],
                               prepare_command(run, "short"))
        for name, rows in res.get("samples", {}).items():
            if name in by_name:
                write_samples(out, by_name[name], rows)
        for key in merged:
            merged[key].update(res.get(key, {}))
    return merged


def run_eval(run: EvalRunConfig) -> dict[str, Any] | None:
    out = Path(run.out_dir)
    t0 = time.time()
    leaves = prepare_once(run, out)
    log.info("prepared %d lm-eval tasks in %.1fs", len(leaves), time.time() - t0)
    if run.eval.prepare_only:
        return None
    max_length = backend_max_length(run, leaves)
    lm_results = evaluate_all(run, leaves, out, max_length)
    if not lm_results["results"]:  # a non-zero rank under accelerate: rank 0 writes
        return None
    scores = collect(leaves, lm_results)
    doc = {**scores, "categories": categories(scores),
           "meta": {"model": model_name(run), "model_path": run.model.path, "label": asdict(run.label),
                    "extra": dict(run.extra), "backend_max_length": max_length,
                    "tasks": {s: selected_tasks(run, s) for s in run.suite},
                    "seconds": time.time() - t0, "config": asdict(run)}}
    # results.json is the stage's completion marker: written atomically, last.
    write_json(out / "results.json", json.loads(json.dumps(doc, default=str)))
    logger = MetricsLogger(out, run.wandb, job_type="eval", config=asdict(run))
    logger.log(flat_metrics(doc))
    logger.summary(flat_metrics(doc))
    logger.artifact(out / "results.json", f"results-{model_name(run)}", "eval_results")
    logger.close()
    return doc
