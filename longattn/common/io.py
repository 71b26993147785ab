"""Readers and writers at the edges of the pipeline: streamed, line-numbered, atomic.

Inputs are read defensively: a line that is not a JSON object is reported (file and line) and the reading
goes on; a file damaged part-way (a truncated or corrupt gzip stream, a corrupt Parquet file) yields what was
read before the damage and then one ``unreadable`` record naming the place. Compression is recognised by
content (the gzip magic bytes), not by the file name. While a file is read whole, its SHA-256 is computed
from the bytes read, so fingerprinting an input needs no second read (``file_digest``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import socket
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

__all__ = ["InputRecord", "InputError", "INPUT_SUFFIXES", "expand_inputs", "iter_records", "iter_file", "is_gzip", "file_digest", "open_text",
           "atomic_writer", "json_digest", "JsonlAppender", "read_jsonl", "write_json"]

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
# What reading a damaged file raises: truncated gzip (EOFError), not gzip / bad CRC (gzip.BadGzipFile is an
# OSError), corrupt deflate data (zlib.error), I/O errors (OSError), corrupt Parquet (pyarrow's ArrowInvalid
# and ArrowIOError are ValueError / OSError subclasses).
_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


class InputError(RuntimeError):
    """An input that cannot be used under the configured policy (``data.on_error=fail``); names file and line."""


@dataclass
class InputRecord:
    """One input line: its record, or why it could not be read (file and line name the place to fix)."""

    path: str
    line: int
    record: dict[str, Any] | None
    error: str | None = None
    unreadable: bool = False
    """The file is damaged from this line on: nothing more of it could be read."""
    decode_error: bool = False
    """The line held invalid UTF-8; it was read with U+FFFD in place of the bad bytes."""
    bom: bool = False
    """A UTF-8 byte order mark was dropped from the start of this line (the first of its file)."""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def open_text(path: str | Path) -> IO[str]:
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


# --- content digests -------------------------------------------------------------------------------
# (real path, size, mtime_ns) -> SHA-256 of a file some reader of this process consumed whole.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _stat_key(path: str, st: os.stat_result) -> tuple[str, int, int]:
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def json_digest(obj: Any, n: int = 12) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys): a cache or
    completion key that changes exactly when what it describes does."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: from a whole read this process already made, else computed (one read)."""
    key = _stat_key(str(path), os.stat(path))
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


class _HashingReader(io.RawIOBase):
    """A read-only byte stream that hashes what its consumer reads (gzip reads its input sequentially)."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.raw.readinto(b)  # type: ignore[attr-defined]
        self.sha.update(memoryview(b)[:n])
        self.n += n
        return n


def _remember_digest(path: str, f: IO[bytes], before: os.stat_result, sha: Any, n: int) -> None:
    """Keep the digest of a whole read, unless the file changed while it was read."""
    after = os.fstat(f.fileno())
    if n == before.st_size and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
        _DIGESTS[_stat_key(path, before)] = sha.hexdigest()


# --- JSON Lines ------------------------------------------------------------------------------------
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


def _record(path: str, i: int, raw: bytes, bom: bool) -> InputRecord:
    try:
        line, bad_utf8 = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        line, bad_utf8 = raw.decode("utf-8", errors="replace"), True
    try:
        return InputRecord(path, i, _parse_line(line), decode_error=bad_utf8, bom=bom)
    except (ValueError, json.JSONDecodeError) as e:
        return InputRecord(path, i, None, f"bad JSON ({e})", decode_error=bad_utf8, bom=bom)


def _damaged(path: str, i: int, e: BaseException) -> InputRecord:
    what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return InputRecord(path, i, None, f"unreadable from here on ({what})", unreadable=True)


def _read_lines(path: str, lines: Iterator[bytes], i: int, pos: int, first_line: int, seekable: bool,
                sha: Any = None) -> Generator[tuple[InputRecord, int], None, bool]:
    """Records of byte lines from line ``i`` at byte ``pos``; returns False when the file broke off (damage).

    A UTF-8 byte order mark at byte 0 is dropped and flagged on the file's first record."""
    bom = False
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return True
        except _READ_ERRORS as e:
            yield _damaged(path, i, e), -1
            return False
        if sha is not None:
            sha.update(raw)
        line = raw
        if pos == 0 and raw.startswith(_BOM):
            line, bom = raw[len(_BOM):], True
        if i >= first_line and line.strip():
            yield _record(path, i, line, bom), pos if seekable else -1
            bom = False
        pos += len(raw)
        i += 1


def _iter_jsonl(path: str, offset: int = -1, first_line: int = 1) -> Iterator[tuple[InputRecord, int]]:
    """(record, byte offset of its line); offsets only for uncompressed files (-1 otherwise)."""
    with open(path, "rb") as f:
        whole = offset < 0 and first_line == 1
        before = os.fstat(f.fileno())
        head = f.read(2)
        # A gzip file cut inside its 2-byte magic number is a damaged gzip file, not one line of text.
        gz = head == _GZIP_MAGIC or (path.endswith(".gz") and len(head) == 1 and head == _GZIP_MAGIC[:1])
        if whole and gz != path.endswith(".gz"):
            log.warning("%s is %s despite its name: read as such", path, "gzip" if gz else "not gzip (plain text)")
        f.seek(0)
        if gz:
            hashing = _HashingReader(f)
            lines = iter(gzip.GzipFile(fileobj=io.BufferedReader(hashing), mode="rb"))
            if (yield from _read_lines(path, lines, 1, 0, first_line, False)) and whole:
                _remember_digest(path, f, before, hashing.sha, hashing.n)
            return
        i, pos = 1, 0
        if offset >= 0:
            f.seek(offset)
            i, pos = first_line, offset
        sha = hashlib.sha256() if whole else None
        if (yield from _read_lines(path, iter(f), i, pos, first_line, True, sha)) and whole:
            _remember_digest(path, f, before, sha, before.st_size if f.tell() == before.st_size else -1)


# --- Parquet ---------------------------------------------------------------------------------------
def _iter_parquet(path: str, first_line: int = 1, batch_rows: int = 256) -> Iterator[tuple[InputRecord, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    errors = (*_READ_ERRORS, pa.ArrowException)
    line = 0
    try:
        batches = iter(pq.ParquetFile(path).iter_batches(batch_size=batch_rows))
    except errors as e:
        yield _damaged(path, 1, e), -1
        return
    while True:
        try:
            batch = next(batches)
            if line + batch.num_rows < first_line:  # skip whole batches without converting them
                line += batch.num_rows
                continue
            rows = batch.to_pylist()
        except StopIteration:
            break
        except errors as e:
            yield _damaged(path, line + 1, e), -1
            return
        for rec in rows:
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


# --- which files are the inputs --------------------------------------------------------------------
INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
"""What a directory in an input list contributes: files whose names end so."""


def _files_under(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.endswith(INPUT_SUFFIXES) and not f.startswith((".", "_"))]
    return found


def expand_inputs(paths: list[str], key: str = "data.paths") -> list[str]:
    """The input files, in order, as real paths (absolute, symlinks resolved).

    A directory stands for the input files under it: recursively, in sorted path order, names ending in
    ``INPUT_SUFFIXES``, hidden names and names starting with ``_`` (``_SUCCESS`` markers) left out. Refused
    with ``ConfigError`` naming ``key``: a path that does not exist, a directory without input files, and the
    same file twice however spelled (relative or absolute, through a symlink, a hard link or its directory).
    """
    from longattn.common.errors import ConfigError

    out: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    for p in paths:
        p = os.path.expanduser(str(p))
        if not os.path.exists(p):
            raise ConfigError(f"{key}: {p} does not exist")
        files = _files_under(p) if os.path.isdir(p) else [p]
        if not files:
            raise ConfigError(f"{key}: directory {p} holds no input files (names ending in "
                              f"{', '.join(INPUT_SUFFIXES)})")
        for f in files:
            st = os.stat(f)
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                raise ConfigError(f"{key}: {f} is listed twice (it is the same file as {seen[ident]}); every "
                                  "window would be scored twice under two ids")
            seen[ident] = f
            out.append(os.path.realpath(f))
    return out


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", *, private: bool = False) -> Iterator[IO[Any]]:
    """Write to a temporary name and rename on success, so a killed run never leaves a half file.

    ``private``: the temporary name is this process's own (host and pid), for files several processes may
    write at once with the same content (ranks making one piece, jobs sharing a cache): each writes a whole
    file, never another's half one, and the last rename wins.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp" if private else f"{path.name}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
