"""Readers and writers at the edges of the pipeline: streamed, line-numbered, atomic."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

__all__ = ["InputRecord", "iter_records", "iter_file", "open_text", "atomic_writer", "JsonlAppender", "read_jsonl",
           "write_json"]


@dataclass
class InputRecord:
    """One input line: its record, or why it could not be read (file and line name the place to fix)."""

    path: str
    line: int
    record: dict[str, Any] | None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def open_text(path: str | Path) -> IO[str]:
    if str(path).endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _parse_line(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        # The reference pre-processing reads `key<TAB>{json}` lines.
        key, sep, rest = line.partition("\t")
        if not sep:
            raise
        obj = json.loads(rest)
        if isinstance(obj, dict):
            obj.setdefault("id", key)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _iter_jsonl(path: str, offset: int = -1, first_line: int = 1) -> Iterator[tuple[InputRecord, int]]:
    """(record, byte offset of its line); offsets only for uncompressed files (-1 otherwise)."""
    if path.endswith(".gz"):
        with open_text(path) as f:
            for i, line in enumerate(f, start=1):
                if i >= first_line and line.strip():
                    yield _record(path, i, line), -1
        return
    with open(path, "rb") as f:
        i = 1
        if offset >= 0:
            f.seek(offset)
            i = first_line
        pos = f.tell()
        for raw in f:
            if i >= first_line and raw.strip():
                yield _record(path, i, raw.decode("utf-8", errors="replace")), pos
            pos += len(raw)
            i += 1


def _record(path: str, i: int, line: str) -> InputRecord:
    try:
        return InputRecord(path, i, _parse_line(line))
    except (ValueError, json.JSONDecodeError) as e:
        return InputRecord(path, i, None, f"bad JSON ({e})")


def _iter_parquet(path: str, first_line: int = 1, batch_rows: int = 256) -> Iterator[tuple[InputRecord, int]]:
    import pyarrow.parquet as pq

    line = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        if line + batch.num_rows < first_line:  # skip whole batches without converting them
            line += batch.num_rows
            continue
        for rec in batch.to_pylist():
            line += 1
            if line >= first_line:
                yield InputRecord(path, line, rec), -1


def iter_file(path: str, offset: int = -1, first_line: int = 1) -> Iterator[tuple[InputRecord, int]]:
    """Records of one input file from a position (byte offset where seekable, else line number)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.paths: input file not found: {path}")
    if path.endswith(".parquet"):
        return _iter_parquet(path, first_line)
    return _iter_jsonl(path, offset, first_line)


def iter_records(paths: list[str]) -> Iterator[InputRecord]:
    """Stream records of every input file in order; a missing file is an error, a bad line is not."""
    for p in paths:
        for rec, _ in iter_file(p):
            yield rec


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read a JSON Lines file the pipeline wrote itself (strict: any bad line is a bug)."""
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w") -> Iterator[IO[str]]:
    """Write to ``path.tmp`` and rename on success, so a killed run never leaves a half file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class JsonlAppender:
    """Append-only JSON Lines journal that survives kills: a torn last line is dropped on reopen."""

    def __init__(self, path: str | Path, key: str = "data_id"):
        self.path = Path(path)
        self.done: set[str] = set()
        """Keys of the rows already in the journal (what a rerun skips)."""
        if self.path.exists():
            good = 0
            with open(self.path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        self.done.add(json.loads(raw)[key])
                    except (json.JSONDecodeError, KeyError):
                        break
                    good += len(raw)
            os.truncate(self.path, good)
            if self.done:
                log.info("resuming: %d rows already in %s", len(self.done), self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write_many(self, rows: list[dict[str, Any]]) -> None:
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_writer(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
