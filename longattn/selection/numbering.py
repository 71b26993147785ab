"""The numbering pass after pre-processing (docs/method.md §1): ids, the optional seeded sample, the plan.

Once every piece is done, rank 0 reads the pieces' markers alone (no window text): ids count per category in
input order, as the reference numbers them, so shard ``s`` starts at a known piece, byte offset and counter
value, and every rank reads its shards straight from the pieces (``iter_piece_shard``). ``window.sample_size``
draws the reference's seeded sample from the same index into ``windows.jsonl``. The run's counters are the
pieces' counters added up in input order, so they read as one process's.
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longattn.common.io import atomic_writer
from longattn.selection.config import WindowConfig
from longattn.selection.pieces import Piece, piece_files
from longattn.selection.shards import Plan
from longattn.selection.windows import window_line

__all__ = ["next_id", "combine_stats", "number_windows", "iter_piece_shard"]

_INDEX_KEYS = ("piece", "rank", "offsets", "categories")
"""Marker keys that describe one piece only (not summed into the run's counters)."""


def next_id(prefix: str, category: str, counters: Counter) -> str:
    """The reference's ids: prefix + 7-digit counter from 1, one counter per (formatted) prefix."""
    p = prefix.format(category=category)
    counters[p] += 1
    return p + str(counters[p]).zfill(7)


def _add(acc: dict[str, Any], part: dict[str, Any]) -> None:
    """Add one piece's counters into the run's: numbers sum, dicts merge, lists concatenate (no repeats)."""
    for k, v in part.items():
        if k not in acc:
            acc[k] = copy.deepcopy(v)
        elif isinstance(v, bool) or not isinstance(v, int | float | dict | list):
            continue
        elif isinstance(v, int | float):
            acc[k] += v
        elif isinstance(v, dict):
            _add(acc[k], v)
        else:
            acc[k] += [x for x in v if x not in acc[k]]


def combine_stats(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's pre-processing counters from its pieces' (in input order), plus the cost per rank."""
    out: dict[str, Any] = {}
    ranks: dict[str, dict[str, float]] = {}
    for m in markers:
        _add(out, {k: v for k, v in m.items() if k not in _INDEX_KEYS})
        r = ranks.setdefault(str(m.get("rank", 0)), {"pieces": 0, "bytes": 0, "seconds": 0.0, "cpu_seconds": 0.0,
                                                     "tokens": 0})
        r["pieces"] += 1
        r["tokens"] += sum(m.get("tokens_in", {}).values())
        for k in ("bytes", "seconds", "cpu_seconds"):
            r[k] += m.get(k, 0)
    out["errors"] = out.get("errors", [])[:20]  # as one process reports them: the first 20 in input order
    out["pieces"] = len(markers)
    out["ranks"] = ranks
    return out


def _markers(pieces: list[Piece], pre_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(piece_files(pre_dir, p.index)[1].read_text()) for p in pieces]


def number_windows(pieces: list[Piece], pre_dir: Path, window: WindowConfig, shard_windows: int,
                   out_dir: Path) -> tuple[Plan, dict[str, Any]]:
    """The shard plan over every piece's windows, and the run's pre-processing counters."""
    markers = _markers(pieces, pre_dir)
    stats = combine_stats(markers)
    if window.sample_size is not None:
        return _write_sample(pieces, markers, pre_dir, window, shard_windows, out_dir / "windows.jsonl", stats), stats
    starts: list[dict[str, Any]] = []
    counters: Counter = Counter()
    n = 0
    for p, m in zip(pieces, markers, strict=True):
        for j, (offset, category) in enumerate(zip(m["offsets"], m["categories"], strict=True)):
            if n % shard_windows == 0:
                starts.append({"path": p.index, "offset": offset, "line": j + 1, "counters": dict(counters)})
            counters[window.id_prefix.format(category=category)] += 1
            n += 1
    sources = [str(piece_files(pre_dir, p.index)[0].relative_to(out_dir)) for p in pieces]
    return Plan(n, shard_windows, starts, sources, {}, [], kind="pieces", id_prefix=window.id_prefix), stats


def _write_sample(pieces: list[Piece], markers: list[dict[str, Any]], pre_dir: Path, window: WindowConfig,
                  shard_windows: int, out: Path, stats: dict[str, Any]) -> Plan:
    """The reference's ``random.sample`` with seed 12, per category, into ``windows.jsonl``.

    ``random.sample`` draws indices from the population size only, so sampling ``range(n)`` picks the same
    windows, in the same order, as sampling the list of windows itself.
    """
    refs: dict[str, list[tuple[int, int]]] = {}
    for p, m in zip(pieces, markers, strict=True):
        for offset, category in zip(m["offsets"], m["categories"], strict=True):
            refs.setdefault(category, []).append((p.index, offset))
    counters: Counter = Counter()
    starts: list[dict[str, Any]] = []
    stats["sampled_out"] = {}
    handles: dict[int, Any] = {}
    n = 0
    try:
        with atomic_writer(out, "wb") as f:
            for category, where in refs.items():
                k = window.sample_size or 0
                picks = range(len(where)) if k >= len(where) else \
                    random.Random(window.sample_seed).sample(range(len(where)), k)
                stats["sampled_out"][category] = len(where) - len(picks)
                for j in picks:
                    piece, offset = where[j]
                    if piece not in handles and len(handles) >= 64:  # a sample jumps between pieces: few open
                        for h in handles.values():
                            h.close()
                        handles.clear()
                    src = handles.get(piece) or handles.setdefault(piece, open(piece_files(pre_dir, piece)[0], "rb"))
                    src.seek(offset)
                    rec = json.loads(src.readline())
                    if n % shard_windows == 0:
                        starts.append({"path": 0, "offset": f.tell(), "line": n + 1})
                    f.write(window_line({"data_id": next_id(window.id_prefix, category, counters), **rec}))
                    n += 1
    finally:
        for h in handles.values():
            h.close()
    return Plan(n, shard_windows, starts, [str(out.relative_to(out.parent))], {}, [], kind="sample")


def iter_piece_shard(plan: Plan, shard: int) -> Iterator[dict[str, Any]]:
    """The windows of one shard of a ``pieces`` plan, numbered as they are read (of a ``sample`` plan: the
    sampled ``windows.jsonl``, numbered already)."""
    start = plan.starts[shard]
    count = min(plan.shard_windows, plan.n_windows - shard * plan.shard_windows)
    counters = Counter(start.get("counters", {}))
    n = 0
    for i in range(start["path"], len(plan.sources)):
        with open(plan.sources[i], "rb") as f:
            if i == start["path"]:
                f.seek(start["offset"])
            for raw in f:
                rec = json.loads(raw)
                yield rec if plan.kind == "sample" else {"data_id": next_id(plan.id_prefix, rec["category"], counters),
                                                         **rec}
                n += 1
                if n == count:
                    return
