"""The stream of windows to score, its validation, and its cut into shards (a ``Plan``)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longattn.common.io import InputRecord, iter_file
from longattn.selection.config import DataConfig
from longattn.selection.records import InputNotes
from longattn.selection.shards import Plan, build_plan

log = logging.getLogger(__name__)

__all__ = ["window_sources", "check_window", "plan_windows", "iter_shard", "iter_all_windows"]


def window_sources(data: DataConfig, out_dir: Path) -> list[str]:
    """``windows.jsonl`` after pre-processing, or the user's reference-format window files as given."""
    return [str(p) for p in data.paths] if data.preprocessed else [str(out_dir / "windows.jsonl")]


def check_window(rec: InputRecord, data: DataConfig, *, warn: bool = False,
                 notes: InputNotes | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(window, None) for a scorable window, else (None, skip reason); warnings name file and line.

    ``notes`` (given by the planning pass, which reads every record once) counts repairs, the category
    mapping and damaged files, and applies ``data.on_error``; later passes give the same verdicts silently.
    """
    if notes is not None:
        notes.read(rec, data.on_error)
    if rec.unreadable:
        return None, "unreadable"
    r = rec.record
    text = None if r is None else r.get(data.text_key, r.get("text"))
    if r is None or not isinstance(text, str) or not r.get("data_id"):
        return _malformed(rec, rec.error or f"needs a string {data.text_key!r} and a 'data_id'", warn)
    if not text.strip():
        return None, "empty"
    category, why = (notes or InputNotes()).category(rec, data.category)
    if category is None:
        return _malformed(rec, why or "", warn)
    return {**r, "data_id": str(r["data_id"]), "content": text, "category": category}, None


def _malformed(rec: InputRecord, why: str, warn: bool) -> tuple[None, str]:
    if warn:
        log.warning("skipping malformed window %s: %s", rec.where, why)
    return None, "malformed"


def _scan(sources: list[str], data: DataConfig, skipped: Counter, skip_lines: list[list[Any]],
          notes: InputNotes) -> Iterator[tuple[int, InputRecord, int, bool]]:
    seen: set[str] = set()
    for i, path in enumerate(sources):
        for rec, offset in iter_file(path):
            window, reason = check_window(rec, data, warn=True, notes=notes)
            if window is not None and window["data_id"] in seen:
                log.warning("skipping duplicate data_id %s at %s", window["data_id"], rec.where)
                window, reason = None, "duplicate_id"
                skip_lines.append([i, rec.line])
            if window is None:
                skipped[reason] += 1
            else:
                seen.add(window["data_id"])
            yield i, rec, offset, window is not None
    notes.log_summary()


def plan_windows(data: DataConfig, out_dir: Path, shard_windows: int) -> Plan:
    """One pass over the windows: validates them, counts what is skipped, records where shards start."""
    sources = window_sources(data, out_dir)
    skipped: Counter = Counter()
    skip_lines: list[list[Any]] = []
    notes = InputNotes()
    plan = build_plan(_scan(sources, data, skipped, skip_lines, notes), sources, shard_windows, skipped, skip_lines)
    plan.notes = notes.to_dict()
    return plan


def iter_shard(plan: Plan, shard: int, data: DataConfig) -> Iterator[dict[str, Any]]:
    """The windows of one shard, read from where the plan says it starts."""
    if plan.kind != "windows":  # the stage's own pre-processed windows (longattn.selection.numbering)
        from longattn.selection.numbering import iter_piece_shard

        yield from iter_piece_shard(plan, shard)
        return
    start = plan.starts[shard]
    count = min(plan.shard_windows, plan.n_windows - shard * plan.shard_windows)
    skip = {(s, line) for s, line in plan.skip_lines}
    n = 0
    for i in range(start["path"], len(plan.sources)):
        first = (start["offset"], start["line"]) if i == start["path"] else (-1, 1)
        for rec, _ in iter_file(plan.sources[i], *first):
            if (i, rec.line) in skip:
                continue
            window, _ = check_window(rec, data)
            if window is None:
                continue
            yield window
            n += 1
            if n == count:
                return


def iter_all_windows(plan: Plan, data: DataConfig) -> Iterator[dict[str, Any]]:
    for s in range(plan.n_shards):
        yield from iter_shard(plan, s, data)
