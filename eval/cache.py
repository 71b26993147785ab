"""The prepared-data cache: every file is named by a digest of what produced it, with a sidecar saying what.

A key holds the sources (path, size and SHA-256 of each file read), the tokenizer's files, the package
versions that shape the data (lm-eval's generators, the tokenizer library), the settings (length, samples,
seed, budget, sentence-split mode) and ``FORMAT``. Change any of them and the digest, hence the file name,
changes: the data is made again instead of reused. ``<file>.json`` beside each data file holds the key, the
record count and the longest prompt in tokens.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from longattn.common.io import atomic_writer, json_digest

__all__ = ["FORMAT", "content_fingerprint", "fingerprint", "keyed_records", "read_sidecar",
           "tokenizer_fingerprint", "versions", "write_records"]

FORMAT = 2
"""Version of the prepared records and of the prompt logic; bump it when either changes."""


_SHA256: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _SHA256:
        with open(path, "rb") as f:
            _SHA256[memo] = hashlib.file_digest(f, "sha256").hexdigest()
    return _SHA256[memo]


def fingerprint(path: str | Path) -> dict[str, Any]:
    """What a source file is: its absolute path, size and SHA-256."""
    p = Path(os.path.expanduser(str(path))).resolve()
    return {"path": str(p), "size": p.stat().st_size, "sha256": file_digest(p)}


def content_fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 only: for copies kept inside the cache, whose place is not part of what they are."""
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> dict[str, Any]:
    """A tokenizer directory's name and one hash over its tokenizer files (same files, same fingerprint)."""
    d = Path(tokenizer_dir)
    files = sorted({*d.glob("tokenizer*"), *d.glob("*.model"), *d.glob("special_tokens_map.json"),
                    *d.glob("vocab.json"), *d.glob("merges.txt")})
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_digest(f).encode())
    return {"name": d.name, "sha256": h.hexdigest()}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Packages whose version can change the prepared data, and the project's ``FORMAT``."""
    return {"format": FORMAT, **{p: _version(p) for p in ("lm_eval", "transformers", "tokenizers", "datasets")}}


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(sidecar(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_records(path: Path, rows: Iterable[dict[str, Any]], key: dict[str, Any],
                  count_tokens: Callable[[dict[str, Any]], int] | None = None) -> dict[str, Any]:
    """JSON Lines written atomically, then the sidecar (written last: its presence marks a whole file)."""
    n, longest = 0, 0
    with atomic_writer(path, private=True) as f:  # a SLURM array may share the cache
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
            longest = max(longest, count_tokens(r) if count_tokens else 0)
    meta = {"key": key, "records": n, "max_tokens": longest}
    with atomic_writer(sidecar(path), private=True) as f:
        json.dump(meta, f, indent=1, default=str)
    return json.loads(json.dumps(meta, default=str))


def keyed_records(stem: Path, key: dict[str, Any], build: Callable[[], Iterable[dict[str, Any]]],
                  count_tokens: Callable[[dict[str, Any]], int] | None = None) -> tuple[Path, dict[str, Any]]:
    """``<stem>.<json_digest(key, 16)>.jsonl``: reused when it and its sidecar exist, else built. Returns the path and
    the sidecar (key, records, max_tokens)."""
    path = stem.with_name(f"{stem.name}.{json_digest(key, 16)}.jsonl")
    meta = read_sidecar(path)
    if path.exists() and meta is not None and meta.get("key") == json.loads(json.dumps(key, default=str)):
        return path, meta
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, write_records(path, build(), key, count_tokens)
