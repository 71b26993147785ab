"""Tokenising one unit of work (a block of records) into megatron indexed datasets: the worker side of
data preparation (``train.prepare`` deals the units out and merges them).

- A **window** unit reads ``unit_records`` lines of ``selected.jsonl`` from a byte offset. Each window is
  re-tokenised without special tokens and becomes one document of its category's dataset: ``[BOS] + window``
  (``data.bos=prepend``) or the window alone. A window that does not re-tokenise to exactly
  ``seq_length`` tokens is cut to ``seq_length`` (counted: ``truncated``) or kept shorter and padded at
  sampling time with the padding masked from the loss (counted: ``short``); it is never merged with another.
- A **short** unit gets its raw lines from the reading process. Each document becomes
  ``[BOS] doc [EOS]`` (or ``doc [EOS]``); ``EOS`` is the end-of-document token that megatron's GPTDataset
  resets positions and attention on.

Each unit writes ``<prefix>[.<category>].bin/.idx/.ids`` and, last, ``<prefix>.done.json``, so a killed
unit is redone and a finished one is skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longattn.common.io import open_text, write_json
from longattn.common.models import ModelConfig

_TOKENIZER: Any = None


@dataclass(frozen=True)
class TokenSpec:
    """What turns text into documents (part of every unit's key)."""

    bos_id: int | None
    """Prepended to every window and short document; None = no BOS."""
    eos_id: int
    """Appended to every short document (the end-of-document token)."""
    seq_length: int
    """Window length in tokens (a window is cut to it)."""
    text_key: str
    """Record field with the text (``text`` when absent)."""
    vocab_size: int
    """Decides the token dtype of the .bin files."""

    @property
    def dtype(self) -> type:
        return np.uint16 if self.vocab_size <= 65536 else np.int32


@dataclass(frozen=True)
class UnitTask:
    """One unit of work, picklable for the tokeniser processes."""

    kind: str
    """``windows`` or ``short``."""
    source: str
    """Input name (``selected`` or the short source's name)."""
    index: int
    prefix: str
    """Output path prefix of this unit."""
    key: str
    """Digest of the inputs; stored in the done marker."""
    spec: TokenSpec
    path: str = ""
    """Windows: the selected.jsonl to read from ``offset``."""
    offset: int = 0
    count: int = 0
    """Windows: lines to read."""
    lines: tuple[tuple[int, str], ...] = ()
    """Short: (line number, raw line) of the unit's records."""


def safe_name(name: str) -> str:
    """A dataset name as a file-name part (categories are free text)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def init_worker(model_cfg: ModelConfig) -> None:
    global _TOKENIZER
    from longattn.common.models import load_tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = load_tokenizer(model_cfg)


def read_lines(path: str, offset: int, count: int) -> Iterator[tuple[int, str]]:
    """``count`` non-blank lines of a plain JSON Lines file from byte ``offset`` (line numbers relative)."""
    with open(path, "rb") as f:
        f.seek(offset)
        n = 0
        for i, raw in enumerate(f):
            if n == count:
                return
            if raw.strip():
                n += 1
                yield i, raw.decode("utf-8", errors="replace")


def iter_raw_records(path: str) -> Iterator[tuple[int, str]]:
    """(line number, raw JSON line) of a JSON Lines (.jsonl, .gz) or Parquet file; blank lines skipped."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        line = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for rec in batch.to_pylist():
                line += 1
                yield line, json.dumps(rec, ensure_ascii=False, default=str)
        return
    with open_text(path) as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                yield i, line


def _text(line: str, key: str, stats: Counter) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        stats["bad_json"] += 1
        return None
    if not isinstance(rec, dict):
        stats["bad_json"] += 1
        return None
    text = rec.get(key, rec.get("text"))
    if not isinstance(text, str) or not text.strip():
        stats["empty"] += 1
        return None
    rec["_text"] = text
    return rec


class _Outputs:
    """One indexed-dataset writer (and id list) per output dataset of a unit."""

    def __init__(self, prefix: str, dtype: type):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix, self.dtype, self._builder = prefix, dtype, IndexedDatasetBuilder
        self.writers: dict[str, Any] = {}
        self.ids: dict[str, list[str]] = {}
        self.tokens: Counter = Counter()

    def path(self, name: str | None) -> str:
        return self.prefix if not name else f"{self.prefix}.{safe_name(name)}"

    def add(self, name: str | None, doc_id: str, tokens: list[int]) -> None:
        key = name or ""
        if key not in self.writers:
            self.writers[key] = self._builder(self.path(name) + ".bin", dtype=self.dtype)
            self.ids[key] = []
        arr = np.asarray(tokens, dtype=self.dtype)
        self.writers[key].add_document(arr, [arr.size])
        self.ids[key].append(doc_id)
        self.tokens[key] += arr.size

    def finalize(self) -> dict[str, dict[str, int]]:
        out = {}
        for key, w in self.writers.items():
            path = self.path(key or None)
            w.finalize(path + ".idx")
            Path(path + ".ids").write_text("".join(json.dumps(i) + "\n" for i in self.ids[key]), encoding="utf-8")
            out[key] = {"docs": len(self.ids[key]), "tokens": int(self.tokens[key])}
        return out


def _batches(items: list, size: int = 64) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def tokenize_unit(task: UnitTask) -> dict[str, Any]:
    """Tokenise one unit and write its files; returns (and stores in the done marker) what it holds."""
    tok, spec = _TOKENIZER, task.spec
    assert tok is not None, "init_worker was not called"
    lines = list(read_lines(task.path, task.offset, task.count)) if task.kind == "windows" else list(task.lines)
    stats: Counter = Counter()
    outputs = _Outputs(task.prefix, spec.dtype)
    recs = [(n, r) for n, line in lines if (r := _text(line, spec.text_key, stats)) is not None]
    bos = [spec.bos_id] if spec.bos_id is not None else []
    for batch in _batches(recs):
        ids = tok([r["_text"] for _, r in batch], add_special_tokens=False)["input_ids"]
        for (line_no, rec), x in zip(batch, ids, strict=True):
            if task.kind == "windows":
                _add_window(outputs, rec, x, bos, spec.seq_length, stats)
            else:
                doc_id = str(rec.get("id", rec.get("data_id", f"{task.source}:{task.index}:{line_no}")))
                outputs.add(None, doc_id, bos + x + [spec.eos_id])
    result = {"key": task.key, "records": len(lines), "outputs": outputs.finalize(), "stats": dict(stats)}
    write_json(task.prefix + ".done.json", result)  # last: a unit without it is redone
    return result


def _add_window(outputs: _Outputs, rec: dict[str, Any], ids: list[int], bos: list[int], w: int,
                stats: Counter) -> None:
    if len(ids) > w:
        stats["truncated"] += 1
        stats["truncated_tokens"] += len(ids) - w
        ids = ids[:w]
    elif len(ids) < w:
        stats["short"] += 1
        stats["short_tokens"] += w - len(ids)
    if not ids:
        stats["empty"] += 1
        return
    category = str(rec.get("category") or "default")
    outputs.add(category, str(rec.get("data_id", "")), bos + ids)
