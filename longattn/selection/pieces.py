"""Pre-processing spread over ranks (docs/method.md §1): the inputs cut into pieces, each piece's windows
written with a completion marker; ``longattn.selection.numbering`` then numbers them in one cheap pass.

- **Pieces.** Every input file is a piece; an uncompressed JSON Lines file larger than ``shard.piece_mb`` is
  cut into byte ranges at line starts (one read that counts newlines, so every record keeps its true line
  number). Rank 0 writes the list once (``preprocess/pieces.json``); pieces go to ranks by size, largest
  first to the least loaded rank. Compressed and Parquet files are one piece each: split a large one into
  several files to spread it.
- **Windows per piece.** A rank tokenises a piece and writes ``preprocess/piece-00042.jsonl``, the windows
  in input order without ids; ``piece-00042.json``, written last, is the completion marker and holds the
  piece's counters and each window's byte offset and category. A killed rank redoes only its piece in flight.
- **Helping.** A rank that has done its own pieces takes pending pieces of other ranks (from the last one
  back), so a SLURM array that runs only some of its elements at a time never waits on elements not yet
  started, and fast ranks shorten the tail. A claim file (``piece-00042.claim``, refreshed while the piece is
  worked on) keeps two ranks off one piece; a claim left by a dead process goes stale after
  ``CLAIM_STALE_SECONDS`` (one of this rank's own is taken at once: it is an earlier, killed run of it).
  Correctness never rests on claims: a piece's bytes depend on its input alone, and every process writes
  under a private temporary name, so two ranks making one piece leave one identical file.

Nothing depends on the world size or on the piece size: ids and outputs are byte-identical to one process's.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from longattn.common.io import InputRecord, atomic_writer, is_gzip, iter_file, write_json
from longattn.selection.config import DataConfig, WindowConfig
from longattn.selection.progress import Progress
from longattn.selection.windows import PreprocessStats, documents_of, write_windows

log = logging.getLogger(__name__)

__all__ = ["Piece", "plan_pieces", "load_pieces", "assign_pieces", "piece_files", "preprocess_piece",
           "preprocess_pieces", "pieces_done", "remove_temporaries", "CLAIM_STALE_SECONDS"]

CLAIM_STALE_SECONDS = 600.0
"""A claim not refreshed for this long belongs to a dead process: another rank may take the piece."""
_HEARTBEAT_SECONDS = 30.0


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
    """Line number of its first line (error messages and ``file:line`` source ids name true lines)."""
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
        log.info("inputs cut into %d pieces of about %g MB (%.1f s)", len(pieces), piece_mb, time.perf_counter() - t0)
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


def _claim_path(pre_dir: Path, index: int) -> Path:
    return pre_dir / f"piece-{index:05d}.claim"


def _claim(pre_dir: Path, index: int, rank: int) -> bool:
    """Take a piece unless another live rank is on it (see the module docstring)."""
    path = _claim_path(pre_dir, index)
    me = json.dumps({"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            held, age = json.loads(path.read_text()), time.time() - path.stat().st_mtime
        except (OSError, ValueError):  # being written this instant: someone has just taken it
            return False
        if held.get("rank") != rank and age < CLAIM_STALE_SECONDS:
            return False
        path.write_text(me)
        return True
    with os.fdopen(fd, "w") as f:
        f.write(me)
    return True


def _claimable(pre_dir: Path, index: int, rank: int) -> bool:
    path = _claim_path(pre_dir, index)
    try:
        held, age = json.loads(path.read_text()), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return held.get("rank") == rank or age >= CLAIM_STALE_SECONDS


def preprocess_piece(piece: Piece, data: DataConfig, window: WindowConfig, tokenizer: Any, pre_dir: Path,
                     rank: int = 0, progress: Progress | None = None) -> dict[str, Any]:
    """Write one piece's windows, then its marker (counters, cost, and each window's offset and category)."""
    out, marker = piece_files(pre_dir, piece.index)
    stats = PreprocessStats()
    position, reported, beat = [0], [0], [time.monotonic()]
    claim = _claim_path(pre_dir, piece.index)

    def on_document(n_windows: int, n_tokens: int) -> None:
        if progress is not None:
            progress.advance(position[0] - reported[0], n_windows, n_tokens)
            reported[0] = position[0]
        if time.monotonic() - beat[0] >= _HEARTBEAT_SECONDS and claim.exists():
            os.utime(claim)  # still alive: the claim stays fresh
            beat[0] = time.monotonic()

    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    with atomic_writer(out, "wb", private=True) as f:  # two ranks may make one piece
        index = write_windows(documents_of(_piece_records(piece, position), data, stats), tokenizer, window,
                              f, stats, on_document)
    done = {**stats.to_dict(), "piece": piece.index, "rank": rank, "bytes": piece.size,
            "seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_seconds() - cpu0,
            "offsets": [o for o, _ in index], "categories": [c for _, c in index]}
    with atomic_writer(marker, "wb", private=True) as f:
        f.write((json.dumps(done) + "\n").encode())
    if progress is not None:
        progress.advance(piece.size - reported[0], 0, 0)
    return done


def pieces_done(pre_dir: Path, pieces: list[Piece]) -> list[bool]:
    return [piece_files(pre_dir, p.index)[1].exists() for p in pieces]


def preprocess_pieces(pieces: list[Piece], owner: list[int], rank: int, world: int, data: DataConfig,
                      window: WindowConfig, tokenizer: Callable[[], Any], pre_dir: Path, *, log_every: int,
                      on_report: Callable[[dict[str, Any]], None] | None = None,
                      wait: Callable[[Callable[[], bool]], None] | None = None) -> None:
    """Pre-process this rank's pending pieces, then help with other ranks' (see the module docstring).

    With ``wait`` (``stage=all``), return only when every piece is done: ``wait(ready)`` polls until all are
    done or one becomes claimable (its claim went stale), which this rank then makes. ``tokenizer`` is loaded
    only if there is a piece to make.
    """
    mine = [p for p, r in zip(pieces, owner, strict=True) if r == rank]
    order = mine + sorted((p for p, r in zip(pieces, owner, strict=True) if r != rank), key=lambda p: -p.index)
    done_mine = sum(pieces_done(pre_dir, mine))
    if done_mine == len(mine):
        log.info("preprocess rank %d/%d: my %d pieces are done", rank, world, len(mine))
    elif done_mine:
        log.info("preprocess rank %d/%d: resuming, %d of my %d pieces already done", rank, world, done_mine,
                 len(mine))
    state: dict[str, Any] = {}
    while True:
        for p in order:
            if not piece_files(pre_dir, p.index)[1].exists() and _claim(pre_dir, p.index, rank):
                _make(p, mine, state, rank, world, data, window, tokenizer, pre_dir, log_every, on_report)
        pending = [p for p in pieces if not piece_files(pre_dir, p.index)[1].exists()]
        if wait is None or not pending:
            break
        wait(lambda pending=pending: all(pieces_done(pre_dir, pending))
             or any(_claimable(pre_dir, p.index, rank) for p in pending))
    if "progress" in state:
        state["progress"].close()


def _make(p: Piece, mine: list[Piece], state: dict[str, Any], rank: int, world: int, data: DataConfig,
          window: WindowConfig, tokenizer: Callable[[], Any], pre_dir: Path, log_every: int,
          on_report: Callable[[dict[str, Any]], None] | None) -> None:
    """Make one claimed piece: this rank's progress counts its own pending pieces, plus each one it helps with."""
    if "progress" not in state:
        done = pieces_done(pre_dir, mine)
        state["tokenizer"] = tokenizer()
        state["progress"] = Progress("preprocess", rank, world, total=sum(q.size for q in mine), unit="bytes",
                                     done_before=sum(q.size for q, d in zip(mine, done, strict=True) if d),
                                     log_every=log_every, snapshot_dir=pre_dir, on_report=on_report)
    if p not in mine:
        state["progress"].total += p.size
        log.info("preprocess rank %d/%d: helping with piece %d", rank, world, p.index)
    preprocess_piece(p, data, window, state["tokenizer"], pre_dir, rank, state["progress"])


def remove_temporaries(pre_dir: Path) -> None:
    """Half-written pieces of killed processes (called once nothing can be pre-processing any more)."""
    for tmp in pre_dir.glob("piece-*.tmp"):
        tmp.unlink(missing_ok=True)
