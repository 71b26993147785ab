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

from longattn.common.distributed import resolve_rank
from longattn.common.io import JsonlAppender, write_json
from longattn.common.lock import OutDirLock
from longattn.common.memory import peak_rss_mb, track_peak_memory
from longattn.common.tracking import MetricsLogger
from longattn.selection.config import SelectRunConfig
from longattn.selection.dataset import write_dataset
from longattn.selection.fingerprints import check_fingerprint, open_run
from longattn.selection.merge import cost_metrics, merge_outputs, shard_path
from longattn.selection.numbering import number_windows
from longattn.selection.pieces import (
    assign_pieces,
    load_pieces,
    pieces_done,
    preprocess_pieces,
    remove_temporaries,
)
from longattn.selection.progress import LOG_SECONDS, LazyLogger, Progress, TotalsLogger, per_rank_status
from longattn.selection.scorers import Scorer
from longattn.selection.shards import MergeMode, Plan, Stage, my_shards
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
    # rank 0 logs progress of every rank to metrics.jsonl / W&B as the run goes, and the results at the end
    logger = LazyLogger(lambda: MetricsLogger(out_dir, cfg.wandb, job_type="select", config=asdict(cfg))) \
        if rank == 0 or cfg.shard.merge == MergeMode.only else None
    try:
        plan = _plan(cfg, out_dir, rank, world, guard, logger)
        if plan is None:
            log.info("rank %d/%d: stage=preprocess: my pieces are pre-processed", rank, world)
            return SelectResult(out_dir, None)
        if cfg.shard.merge != MergeMode.only:
            _score_shards(cfg, plan, shards_dir, rank, world, logger)
        if not (rank == 0 and cfg.shard.merge == MergeMode.auto) and cfg.shard.merge != MergeMode.only:
            log.info("rank %d/%d: my shards are done; rank 0 merges", rank, world)
            return SelectResult(out_dir, None)
        _wait_for_shards(cfg, plan, shards_dir, world, logger)
        if not cfg.data.preprocessed:  # nothing can be pre-processing now: drop half pieces of killed ranks
            remove_temporaries(out_dir / "preprocess")
        guard.check_unchanged()
        pre = _preprocess_stats(cfg, out_dir)
        metrics = merge_outputs(cfg, plan, out_dir, shards_dir, pre)
        metrics.update(input_report(cfg, pre, plan, metrics))
        write_json(out_dir / "metrics.json", metrics)
        if cfg.dataset.enabled:  # the kept windows as Parquet + a dataset card (longattn.selection.dataset)
            write_dataset(cfg, out_dir, metrics)
        _log_run(cfg, out_dir, metrics, logger)
    finally:
        if logger is not None:
            logger.close()
    return SelectResult(out_dir, metrics, {n: out_dir / n for n in OUTPUTS if (out_dir / n).exists()})


def _log_run(cfg: SelectRunConfig, out_dir: Path, metrics: dict[str, Any], lazy: LazyLogger) -> None:
    """metrics.jsonl always; with wandb.enabled also W&B: summary numbers, cost, score histograms, the selection."""
    from longattn.common.io import read_jsonl

    logger = lazy.get()
    flat = {f"select/{cat}/{k}": v for cat, c in metrics["categories"].items() for k, v in c.items()
            if isinstance(v, int | float)}
    flat.update({"select/windows": metrics["windows"], "select/kept": metrics["counts"]["kept"],
                 "select/score_seconds": metrics["score_seconds"],
                 "select/windows_per_s": metrics["windows_per_second"] or 0.0})
    flat.update(cost_metrics(metrics.get("cost", {})))
    logger.log(flat)
    logger.summary(flat)
    if logger.run is not None:
        cols: dict[str, list[float]] = {}
        for r in read_jsonl(out_dir / "scores.jsonl"):
            for key in ("ds", "var", "lds"):
                cols.setdefault(f"select/{r['category']}/{key}", []).append(r[key])
        logger.histograms(cols)
        logger.artifact(out_dir / "selected.jsonl", f"selected-{cfg.scorer.name}-{cfg.model.name}", "dataset")


# --- pre-processing and the plan ----------------------------------------------------------------------
def _plan(cfg: SelectRunConfig, out_dir: Path, rank: int, world: int, guard: Any,
          logger: LazyLogger | None) -> Plan | None:
    """Pre-process this rank's pieces, then (after every rank's) the shard plan that rank 0 writes once;
    None with ``stage=preprocess`` (this rank's pieces are done, nothing else is wanted of it)."""
    plan_path = out_dir / "shards" / "plan.json"
    if not cfg.data.preprocessed and not plan_path.exists():
        _preprocess(cfg, out_dir, rank, world, logger)
    if cfg.stage == Stage.preprocess:
        return None
    if rank == 0:
        if not plan_path.exists():
            _build_plan(cfg, out_dir).save(plan_path)
        guard.inputs_read()
    else:
        cfg.shard.wait(plan_path.exists, f"rank 0 to plan the shards ({plan_path})")
    return Plan.load(plan_path)


def _preprocess(cfg: SelectRunConfig, out_dir: Path, rank: int, world: int, logger: LazyLogger | None) -> None:
    """This rank's pieces (``longattn.selection.pieces``); with ``stage=all`` then wait for every rank's."""
    from longattn.common.models import load_tokenizer

    pre_dir = out_dir / "preprocess"
    pieces = load_pieces(pre_dir, list(cfg.data.paths), cfg.shard.piece_mb, rank, cfg.shard.wait)
    owner = assign_pieces(pieces, world)
    totals = TotalsLogger(logger, pre_dir, "preprocess", world, sum(p.size for p in pieces)) if logger else None
    status = lambda: per_rank_status(pieces_done(pre_dir, pieces), owner, world, "pieces")  # noqa: E731
    wait = None if cfg.stage == Stage.preprocess else \
        (lambda ready: _wait_reporting(cfg, ready, status, "the other ranks' pieces", totals))
    preprocess_pieces(pieces, owner, rank, world, cfg.data, cfg.window, lambda: load_tokenizer(cfg.model), pre_dir,
                      log_every=cfg.log_every, on_report=totals, wait=wait)
    log.info("%s", status())


def _build_plan(cfg: SelectRunConfig, out_dir: Path) -> Plan:
    """Rank 0: number the pre-processed windows (and write ``preprocess.json``), or scan the user's windows."""
    if cfg.data.preprocessed:
        return plan_windows(cfg.data, out_dir, cfg.shard.windows)
    pre_dir = out_dir / "preprocess"
    pieces = load_pieces(pre_dir, list(cfg.data.paths), cfg.shard.piece_mb, 0, cfg.shard.wait)
    plan, stats = number_windows(pieces, pre_dir, cfg.window, cfg.shard.windows, out_dir)
    write_json(out_dir / "preprocess.json", stats)
    return plan


def _wait_reporting(cfg: SelectRunConfig, ready: Callable[[], bool], status: Callable[[], str], what: str,
                    totals: TotalsLogger | None) -> None:
    """Wait for ``ready()``, logging ``status()`` (units done per rank) and rank 0's totals every minute."""
    last = [time.monotonic()]

    def check() -> bool:
        if ready():
            return True
        if time.monotonic() - last[0] >= LOG_SECONDS:
            log.info("waiting for %s: %s", what, status())
            if totals is not None:
                totals()
            last[0] = time.monotonic()
        return False

    cfg.shard.wait(check, what)


def _preprocess_stats(cfg: SelectRunConfig, out_dir: Path) -> dict[str, Any]:
    marker = out_dir / "preprocess.json"
    return json.loads(marker.read_text()) if not cfg.data.preprocessed and marker.exists() else {}


# --- scoring ------------------------------------------------------------------------------------------
def _shard_size(plan: Plan, shard: int) -> int:
    return min(plan.shard_windows, plan.n_windows - shard * plan.shard_windows)


def _score_shards(cfg: SelectRunConfig, plan: Plan, shards_dir: Path, rank: int, world: int,
                  logger: LazyLogger | None) -> None:
    mine = my_shards(plan.n_shards, rank, world)
    todo = [s for s in mine if not shard_path(shards_dir, s).exists()]
    if not todo:
        return
    from longattn.selection.scorers import build_scorer

    scorer = build_scorer(cfg.scorer, cfg.model, cfg.window.length)
    _record_rank(shards_dir, rank, scorer)  # at load, so a rank killed later still reports its device
    totals = TotalsLogger(logger, shards_dir, "score", world, plan.n_windows) if logger is not None else None
    progress = Progress("score", rank, world, total=sum(_shard_size(plan, s) for s in mine),
                        done_before=sum(_shard_size(plan, s) for s in mine if s not in todo),
                        log_every=cfg.log_every, snapshot_dir=shards_dir, on_report=totals)
    for s in todo:
        _score_shard(cfg, plan, s, shards_dir, scorer, progress)
    progress.close()
    _record_rank(shards_dir, rank, scorer)  # again at the end, with the scoring's peak memory


def _wait_for_shards(cfg: SelectRunConfig, plan: Plan, shards_dir: Path, world: int,
                     logger: LazyLogger | None) -> None:
    """The merging rank waits for every shard, reporting shards done per rank; ``only`` names the missing."""
    done = lambda: [shard_path(shards_dir, s).exists() for s in range(plan.n_shards)]  # noqa: E731
    if cfg.shard.merge == MergeMode.only and not all(flags := done()):
        missing = [s for s, d in enumerate(flags) if not d]
        raise RuntimeError(f"shard.merge=only but shards {missing[:20]} of {plan.n_shards} are not scored yet")
    totals = TotalsLogger(logger, shards_dir, "score", world, plan.n_windows) if logger is not None else None
    status = lambda: per_rank_status(done(), [s % world for s in range(plan.n_shards)], world, "shards")  # noqa: E731
    _wait_reporting(cfg, lambda: all(done()), status, "the other ranks' shards", totals)
    log.info("merging: %s", status())


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


PLACE_KEYS = ("source_id", "doc_tokens", "token_start", "token_end")
"""Where a window comes from, copied into its score row: the merge's overlap policy reads them there."""


def _placed(rows: list[dict[str, Any]], batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    where = {w["data_id"]: w for w in batch}
    for r in rows:
        w = where.get(r["data_id"], {})
        r.update({k: w[k] for k in PLACE_KEYS if k in w and k not in r})
    return rows


def _score_shard(cfg: SelectRunConfig, plan: Plan, shard: int, shards_dir: Path, scorer: Scorer,
                 progress: Progress) -> None:
    """Score one shard into its journal; rename it when complete (the completion marker)."""
    journal = JsonlAppender(shard_path(shards_dir, shard, "partial.jsonl"))
    clock = shard_path(shards_dir, shard, "timing.json")
    timing = json.loads(clock.read_text()) if clock.exists() and journal.done else {"score_seconds": 0.0, "windows": 0}
    timing.update(rank=progress.rank, device=scorer.device)  # the cost table groups shards by rank and device
    progress.resumed(len(journal.done))
    todo = (w for w in iter_shard(plan, shard, cfg.data) if w["data_id"] not in journal.done)
    for batch, prepared in _prepared(scorer, _batches(todo, cfg.scorer.batch_size)):
        t0 = time.perf_counter()
        rows = _placed(scorer.score(batch, prepared), batch)
        timing["score_seconds"] += time.perf_counter() - t0
        timing["windows"] += len(rows)
        journal.write_many(rows)
        write_json(clock, timing)  # cost survives restarts, so metrics.json reports the whole run
        progress.advance(len(rows), len(rows), sum(int(r.get("n_tokens") or 0) for r in rows))
    journal.close()
    os.replace(journal.path, shard_path(shards_dir, shard))
