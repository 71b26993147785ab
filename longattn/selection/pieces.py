"""Pre-processing spread over ranks (docs/method.md §1): the inputs cut into pieces, each piece's windows
written by one rank with a completion marker, then one cheap pass that numbers (or samples) the windows.

- **Pieces.** Every input file is a piece; an uncompressed JSON Lines file larger than ``shard.piece_mb`` is
  cut into byte ranges at line starts (one read that counts newlines, so every record keeps its true line
  number). Rank 0 writes the list once (``preprocess/pieces.json``); pieces go to ranks by size, largest
  first to the least loaded rank. Compressed and Parquet files are one piece each: split a large one into
  several files to spread it.
- **Windows per piece.** A rank tokenises its pieces and writes ``preprocess/piece-00042.jsonl``, the windows
  in input order without ids; ``piece-00042.json``, written last, is the completion marker and holds the
  piece's counters and each window's byte offset and category. A killed rank redoes only its piece in flight.
- **Numbering.** Once every piece is done, rank 0 reads the markers alone (no window text) and writes the
  shard plan: ids count per category in input order (the reference's numbering), so shard ``s`` starts at a
  known piece, byte offset and counter value, and every rank reads its shards straight from the pieces.
  ``window.sample_size`` draws the reference's seeded sample from the same index into ``windows.jsonl``.

Nothing depends on the world size or on the piece size: ids and outputs are byte-identical to one process's.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from longattn.common.io import InputRecord, atomic_writer, is_gzip, iter_file, write_json
from longattn.selection.config import DataConfig, WindowConfig
from longattn.selection.progress import Progress
from longattn.selection.shards import Plan
from longattn.selection.windows import PreprocessStats, located_documents, window_line, write_windows

log = logging.getLogger(__name__)

__all__ = ["Piece", "plan_pieces", "load_pieces", "assign_pieces", "piece_files", "preprocess_pieces",
           "pieces_done", "number_windows", "iter_piece_shard", "combine_stats", "next_id"]

_INDEX_KEYS = ("piece", "rank", "offsets", "categories")
"""Marker keys that describe one piece only (not summed into the run's counters)."""


@dataclass
class Piece:
    """A unit of pre-processing: a whole input file or a byte range of one, starting at a line start."""

    index: int
    path: str
    start: int = 0
    """Byte offset of the piece's first line."""
    end: int = -1
    """Byte offset after its last line; -1 = to the end of the file."""
    line: int = 1
    """Line number of its first line (error messages and ``source_line`` name true lines)."""
    size: int = 0
    """Bytes on disk (balancing and ETA)."""


# --- cutting the inputs ---------------------------------------------------------------------------
def _count_newlines(f: Any, start: int, end: int, chunk: int = 1 << 24) -> int:
    f.seek(start)
    n, left = 0, end - start
    while left > 0 and (buf := f.read(min(chunk, left))):
        n += buf.count(b"\n")
        left -= len(buf)
    return n


def _cuts(path: str, size: int, piece_bytes: int) -> list[tuple[int, int]]:
    """(byte offset, line number) of each piece start: the first line start at or after every
    ``piece_bytes`` (so a piece is at least that long, a line never split)."""
    cuts = [(0, 1)]
    with open(path, "rb") as f:
        while cuts[-1][0] + piece_bytes < size:
            start, line = cuts[-1]
            f.seek(start + piece_bytes - 1)
            f.readline()
            cut = f.tell()
            if cut >= size:
                break
            cuts.append((cut, line + _count_newlines(f, start, cut)))
    return cuts


def plan_pieces(paths: list[str], piece_bytes: int) -> list[Piece]:
    pieces: list[Piece] = []
    for path in paths:
        size = Path(path).stat().st_size
        splittable = not path.endswith(".parquet") and size > piece_bytes and not is_gzip(path)
        cuts = _cuts(path, size, piece_bytes) if splittable else [(0, 1)]
        for j, (start, line) in enumerate(cuts):
            end = cuts[j + 1][0] if j + 1 < len(cuts) else -1
            pieces.append(Piece(len(pieces), path, start, end, line, (size if end < 0 else end) - start))
    return pieces


def load_pieces(pre_dir: Path, paths: list[str], piece_mb: float, rank: int,
                wait: Callable[[Callable[[], bool], str], None]) -> list[Piece]:
    """Rank 0 cuts the inputs once (``pieces.json``); the other ranks wait for the list. A rerun keeps the
    pieces of the first run (their files are on disk), whatever ``shard.piece_mb`` says now."""
    path = pre_dir / "pieces.json"
    piece_bytes = max(1, int(piece_mb * 2**20))
    if rank == 0 and not path.exists():
        pre_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        pieces = plan_pieces(list(paths), piece_bytes)
        write_json(path, {"piece_bytes": piece_bytes, "pieces": [asdict(p) for p in pieces]})
        log.info("inputs cut into %d pieces of about %.0f MB (%.1f s)", len(pieces), piece_mb, time.perf_counter() - t0)
    else:
        wait(path.exists, f"rank 0 to cut the inputs into pieces ({path})")
    saved = json.loads(path.read_text())
    if saved["piece_bytes"] != piece_bytes:
        log.info("keeping the pieces of this out_dir's first run (%d bytes each; shard.piece_mb=%g is ignored)",
                 saved["piece_bytes"], piece_mb)
    return [Piece(**p) for p in saved["pieces"]]


def assign_pieces(pieces: list[Piece], world: int) -> list[int]:
    """Rank of every piece: largest first to the least loaded rank (ties to the lower rank)."""
    loads, owner = [0] * world, [0] * len(pieces)
    for p in sorted(pieces, key=lambda p: (-p.size, p.index)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owner[p.index] = r
        loads[r] += max(p.size, 1)
    return owner


# --- one piece ------------------------------------------------------------------------------------
def piece_files(pre_dir: Path, index: int) -> tuple[Path, Path]:
    """(windows, completion marker) of a piece."""
    return pre_dir / f"piece-{index:05d}.jsonl", pre_dir / f"piece-{index:05d}.json"


def _piece_records(piece: Piece, position: list[int]) -> Iterator[InputRecord]:
    """The records of one piece; ``position[0]`` follows the bytes read (plain files only)."""
    whole = piece.start == 0 and piece.end < 0
    for rec, pos in iter_file(piece.path) if whole else iter_file(piece.path, piece.start, piece.line):
        if piece.end >= 0 and pos >= piece.end:
            return
        if pos >= 0:
            position[0] = pos - piece.start
        yield rec


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the tokeniser pool)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def preprocess_piece(piece: Piece, data: DataConfig, window: WindowConfig, tokenizer: Any, pre_dir: Path,
                     rank: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Write one piece's windows, then its marker (counters, cost, and each window's offset and category)."""
    out, marker = piece_files(pre_dir, piece.index)
    stats = PreprocessStats()
    position, reported = [0], [0]

    def on_document(n_windows: int, n_tokens: int) -> None:
        if progress is not None:
            progress.advance(position[0] - reported[0], n_windows, n_tokens)
            reported[0] = position[0]

    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    with atomic_writer(out, "wb") as f:
        index = write_windows(located_documents(_piece_records(piece, position), data, stats), tokenizer, window,
                              f, stats, on_document)
    done = {**stats.to_dict(), "piece": piece.index, "rank": rank, "bytes": piece.size,
            "seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - cpu0,
            "offsets": [o for o, _ in index], "categories": [c for _, c in index]}
    write_json(marker, done)
    if progress is not None:
        progress.advance(piece.size - reported[0], 0, 0)
    return done


def pieces_done(pre_dir: Path, pieces: list[Piece]) -> list[bool]:
    return [piece_files(pre_dir, p.index)[1].exists() for p in pieces]


def preprocess_pieces(pieces: list[Piece], owner: list[int], rank: int, world: int, data: DataConfig,
                      window: WindowConfig, tokenizer: Callable[[], Any], pre_dir: Path, *, log_every: int,
                      on_report: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Pre-process this rank's pieces that have no marker yet (``tokenizer`` is loaded only if one is left)."""
    mine = [p for p, r in zip(pieces, owner, strict=True) if r == rank]
    done = pieces_done(pre_dir, mine)
    todo = [p for p, d in zip(mine, done, strict=True) if not d]
    if not todo:
        log.info("preprocess rank %d/%d: my %d pieces are done", rank, world, len(mine))
        return
    progress = Progress("preprocess", rank, world, total=sum(p.size for p in mine), unit="bytes",
                        done_before=sum(p.size for p, d in zip(mine, done, strict=True) if d), log_every=log_every,
                        snapshot_dir=pre_dir, on_report=on_report)
    if len(todo) < len(mine):
        log.info("preprocess rank %d/%d: resuming, %d of my %d pieces already done", rank, world,
                 len(mine) - len(todo), len(mine))
    tok = tokenizer()
    for p in todo:
        preprocess_piece(p, data, window, tok, pre_dir, rank, progress)
    progress.close()


# --- numbering ------------------------------------------------------------------------------------
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
    sources = [str(piece_files(pre_dir, p.index)[0]) for p in pieces]
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
    return Plan(n, shard_windows, starts, [str(out)], {}, [], kind="windows")


def iter_piece_shard(plan: Plan, shard: int) -> Iterator[dict[str, Any]]:
    """The windows of one shard of a ``pieces`` plan, numbered as they are read."""
    start = plan.starts[shard]
    count = min(plan.shard_windows, plan.n_windows - shard * plan.shard_windows)
    counters = Counter(start["counters"])
    n = 0
    for i in range(start["path"], len(plan.sources)):
        with open(plan.sources[i], "rb") as f:
            if i == start["path"]:
                f.seek(start["offset"])
            for raw in f:
                rec = json.loads(raw)
                yield {"data_id": next_id(plan.id_prefix, rec["category"], counters), **rec}
                n += 1
                if n == count:
                    return
