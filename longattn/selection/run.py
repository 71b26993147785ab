"""The selection stage end to end: pre-process -> plan shards -> score my shards -> merge.

Every input window ends up kept (``selected.jsonl``), rejected with its reason (``rejected.jsonl``) or
counted as skipped (``metrics.json``). Work is cut into shards with completion markers (``longattn.selection.shards``),
so any number of ranks can score, and a rerun with the same ``out_dir`` redoes nothing that finished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from longattn.common.distributed import resolve_rank
from longattn.common.io import JsonlAppender, write_json
from longattn.common.lock import OutDirLock
from longattn.common.memory import peak_rss_mb, track_peak_memory
from longattn.selection.config import SelectRunConfig
from longattn.selection.dataset import write_dataset
from longattn.selection.fingerprints import check_fingerprint, open_run
from longattn.selection.merge import merge_outputs, shard_path
from longattn.selection.scorers import Scorer
from longattn.selection.shards import MergeMode, Plan, my_shards
from longattn.selection.sources import iter_shard, plan_windows
from longattn.selection.summary import input_report

log = logging.getLogger(__name__)

__all__ = ["run_select", "SelectResult", "check_fingerprint"]

OUTPUTS = ["windows.jsonl", "scores.jsonl", "selected.jsonl", "rejected.jsonl", "metrics.json", "report.png",
           "report.md"]


@dataclass
class SelectResult:
    out_dir: Path
    metrics: dict[str, Any] | None
    """None on a rank that only scored (the merging rank writes metrics.json)."""
    paths: dict[str, Path] = field(default_factory=dict)


def run_select(cfg: SelectRunConfig, on_checked: Callable[[], None] | None = None) -> SelectResult:
    """Run (or resume) the selection stage into ``cfg.out_dir`` as this process's rank.

    ``out_dir`` is locked for this job (``longattn.common.lock``) and checked against the config and input
    content its outputs were made from (``longattn.selection.fingerprints``) before anything is written;
    ``on_checked`` runs then (the entry point saves ``config.yaml``).
    """
    rank, world = resolve_rank(cfg.shard.rank, cfg.shard.world_size)
    with OutDirLock(cfg.out_dir, rank, world), track_peak_memory():
        return _run_select(cfg, rank, world, on_checked)


def _run_select(cfg: SelectRunConfig, rank: int, world: int, on_checked: Callable[[], None] | None) -> SelectResult:
    out_dir = Path(cfg.out_dir)
    shards_dir = out_dir / "shards"
    guard = open_run(cfg, out_dir, rank, on_checked)
    shards_dir.mkdir(parents=True, exist_ok=True)
    plan_path = shards_dir / "plan.json"
    if rank == 0:
        _preprocess_once(cfg, out_dir)
        if not plan_path.exists():
            plan_windows(cfg.data, out_dir, cfg.shard.windows).save(plan_path)
        guard.inputs_read()
    else:
        cfg.shard.wait(plan_path.exists, f"rank 0 to plan the shards ({plan_path})")
    plan = Plan.load(plan_path)
    if cfg.shard.merge != MergeMode.only:
        _score_shards(cfg, plan, shards_dir, rank, world)
    if not (rank == 0 and cfg.shard.merge == MergeMode.auto) and cfg.shard.merge != MergeMode.only:
        log.info("rank %d/%d: my shards are done; rank 0 merges", rank, world)
        return SelectResult(out_dir, None)
    missing = lambda: [s for s in range(plan.n_shards) if not shard_path(shards_dir, s).exists()]  # noqa: E731
    if cfg.shard.merge == MergeMode.only and missing():
        raise RuntimeError(f"shard.merge=only but shards {missing()[:20]} of {plan.n_shards} are not scored yet")
    cfg.shard.wait(lambda: not missing(), "the other ranks' shards")
    guard.check_unchanged()
    pre = _preprocess_stats(cfg, out_dir)
    metrics = merge_outputs(cfg, plan, out_dir, shards_dir, pre)
    metrics.update(input_report(cfg, pre, plan, metrics))
    write_json(out_dir / "metrics.json", metrics)
    if cfg.dataset.enabled:  # the kept windows as Parquet + a dataset card (longattn.selection.dataset)
        write_dataset(cfg, out_dir, metrics)
    _log_run(cfg, out_dir, metrics)
    return SelectResult(out_dir, metrics, {n: out_dir / n for n in OUTPUTS if (out_dir / n).exists()})


def _log_run(cfg: SelectRunConfig, out_dir: Path, metrics: dict[str, Any]) -> None:
    """metrics.jsonl always; with wandb.enabled also W&B: summary numbers, score histograms, the selection."""
    from longattn.common.io import read_jsonl
    from longattn.common.tracking import MetricsLogger

    logger = MetricsLogger(out_dir, cfg.wandb, job_type="select", config=asdict(cfg))
    flat = {f"select/{cat}/{k}": v for cat, c in metrics["categories"].items() for k, v in c.items()
            if isinstance(v, int | float)}
    flat.update({"select/windows": metrics["windows"], "select/kept": metrics["counts"]["kept"],
                 "select/score_seconds": metrics["score_seconds"],
                 "select/windows_per_s": metrics["windows_per_second"] or 0.0})
    logger.log(flat)
    logger.summary(flat)
    if logger.run is not None:
        cols: dict[str, list[float]] = {}
        for r in read_jsonl(out_dir / "scores.jsonl"):
            for key in ("ds", "var", "lds"):
                cols.setdefault(f"select/{r['category']}/{key}", []).append(r[key])
        logger.histograms(cols)
        logger.artifact(out_dir / "selected.jsonl", f"selected-{cfg.scorer.name}-{cfg.model.name}", "dataset")
    logger.close()


# --- pre-processing -----------------------------------------------------------------------------------
def _preprocess_once(cfg: SelectRunConfig, out_dir: Path) -> None:
    """Rank 0 writes windows.jsonl, then preprocess.json (the completion marker, with the counters)."""
    marker = out_dir / "preprocess.json"
    if cfg.data.preprocessed:
        return
    if marker.exists() and (out_dir / "windows.jsonl").exists():
        log.info("pre-processing already done (%s): skipping", marker)
        return
    from longattn.common.models import load_tokenizer
    from longattn.selection.windows import preprocess

    t0 = time.perf_counter()
    stats = preprocess(cfg.data, cfg.window, load_tokenizer(cfg.model), out_dir)
    write_json(marker, {**stats.to_dict(), "seconds": time.perf_counter() - t0})


def _preprocess_stats(cfg: SelectRunConfig, out_dir: Path) -> dict[str, Any]:
    marker = out_dir / "preprocess.json"
    return json.loads(marker.read_text()) if not cfg.data.preprocessed and marker.exists() else {}


# --- scoring ------------------------------------------------------------------------------------------
def _score_shards(cfg: SelectRunConfig, plan: Plan, shards_dir: Path, rank: int, world: int) -> None:
    todo = [s for s in my_shards(plan.n_shards, rank, world) if not shard_path(shards_dir, s).exists()]
    if not todo:
        return
    from longattn.selection.scorers import build_scorer

    scorer = build_scorer(cfg.scorer, cfg.model, cfg.window.length)
    _record_rank(shards_dir, rank, scorer)  # at load, so a rank killed later still reports its device
    n_mine = sum(min(plan.shard_windows, plan.n_windows - s * plan.shard_windows) for s in todo)
    with tqdm(total=n_mine, desc=f"score rank {rank}/{world}", unit="win", mininterval=2.0, disable=None) as bar:
        for s in todo:
            _score_shard(cfg, plan, s, shards_dir, scorer, bar)
    _record_rank(shards_dir, rank, scorer)  # again at the end, with the scoring's peak memory


def _record_rank(shards_dir: Path, rank: int, scorer: Scorer) -> None:
    write_json(shards_dir / f"rank-{rank:05d}.json", {
        "load_seconds": scorer.load_seconds, "device": scorer.device,
        "peak_rss_mb": peak_rss_mb()})


def _batches(windows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for w in windows:
        batch.append(w)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prepared(scorer: Scorer, batches: Iterator[list[dict[str, Any]]]) -> Iterator[tuple[list[dict[str, Any]], Any]]:
    """(batch, prepared input): the next batch is tokenised in a thread while this one is scored
    (fast tokenizers and torch kernels release the GIL)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for b in batches:
            future = pool.submit(scorer.prepare, b)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (b, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def _score_shard(cfg: SelectRunConfig, plan: Plan, shard: int, shards_dir: Path, scorer: Scorer, bar: tqdm) -> None:
    """Score one shard into its journal; rename it when complete (the completion marker)."""
    journal = JsonlAppender(shard_path(shards_dir, shard, "partial.jsonl"))
    clock = shard_path(shards_dir, shard, "timing.json")
    timing = json.loads(clock.read_text()) if clock.exists() and journal.done else {"score_seconds": 0.0, "windows": 0}
    bar.update(len(journal.done))
    todo = (w for w in iter_shard(plan, shard, cfg.data) if w["data_id"] not in journal.done)
    for batch, prepared in _prepared(scorer, _batches(todo, cfg.scorer.batch_size)):
        t0 = time.perf_counter()
        rows = scorer.score(batch, prepared)
        timing["score_seconds"] += time.perf_counter() - t0
        timing["windows"] += len(rows)
        journal.write_many(rows)
        write_json(clock, timing)  # cost survives restarts, so metrics.json reports the whole run
        bar.update(len(rows))
    journal.close()
    os.replace(journal.path, shard_path(shards_dir, shard))
