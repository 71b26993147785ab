"""Pre-processing (docs/method.md §1, paper Algorithm 1): documents -> 32k-token windows, streamed and counted."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, BinaryIO

from longattn.common.io import InputRecord, iter_records
from longattn.selection.config import DataConfig, WindowConfig
from longattn.selection.records import InputNotes

log = logging.getLogger(__name__)

__all__ = ["slide_windows", "Document", "PreprocessStats", "documents", "documents_of", "window_record",
           "window_line", "write_windows"]


def slide_windows(n: int, w: int) -> list[tuple[int, int]]:
    """Algorithm 1: [start, end) spans of the windows of an n-token document, in the reference's order.

    Windows are cut from both ends towards the middle while more than 3W tokens remain; the remainder
    Δ gives two windows (W < Δ <= 2W) or three, the middle one centred (2W < Δ <= 3W). As in the
    reference, n < W gives nothing and so does n == W (Δ = W matches no branch).
    """
    spans: list[tuple[int, int]] = []
    if n < w:
        return spans
    left, right = 0, n
    while right - left > 3 * w:
        spans.append((left, left + w))
        left += w
        spans.append((right - w, right))
        right -= w
    rem = right - left
    if w < rem <= 2 * w:
        spans += [(left, left + w), (right - w, right)]
    elif 2 * w < rem <= 3 * w:
        mid = left + (rem - w) // 2
        spans += [(left, left + w), (mid, mid + w), (right - w, right)]
    return spans


@dataclass
class Document:
    """A readable input document: text plus where it came from."""

    text: str
    category: str
    source_id: str


@dataclass
class PreprocessStats:
    """Per-reason document counters and per-category window/token counts."""

    documents: int = 0
    """Records read, plus one for the unread rest of each damaged file."""
    skipped: Counter = field(default_factory=Counter)
    """reason -> documents: malformed, empty, too_short (n < W), exact_window (n == W, yields nothing),
    unreadable (the unread rest of a damaged file, one per file)."""
    windows: Counter = field(default_factory=Counter)
    tokens_in: Counter = field(default_factory=Counter)
    """category -> tokens of all readable documents."""
    tokens_windows: Counter = field(default_factory=Counter)
    sampled_out: Counter = field(default_factory=Counter)
    """category -> windows dropped by window.sample_size."""
    errors: list[str] = field(default_factory=list)
    """First malformed lines (file:line: why), for the log."""
    notes: InputNotes = field(default_factory=InputNotes)
    """Decode errors, byte order marks, category mapping and damaged files met while reading."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "skipped": dict(self.skipped),
            "windows": dict(self.windows),
            "tokens_in": dict(self.tokens_in),
            "tokens_windows": dict(self.tokens_windows),
            "sampled_out": dict(self.sampled_out),
            "errors": self.errors[:20],
            **self.notes.to_dict(),
        }


def _to_document(rec: InputRecord, cfg: DataConfig, stats: PreprocessStats) -> Document | None:
    stats.documents += 1
    stats.notes.read(rec, cfg.on_error)
    if rec.unreadable:
        stats.skipped["unreadable"] += 1
        return None
    if rec.record is None:
        return _malformed(stats, f"{rec.where}: {rec.error}")
    text = rec.record.get(cfg.text_key, rec.record.get("text"))
    if text is None:
        return _malformed(stats, f"{rec.where}: missing key {cfg.text_key!r}")
    if not isinstance(text, str):
        return _malformed(stats, f"{rec.where}: key {cfg.text_key!r} is {type(text).__name__}, not a string")
    if not text.strip():
        stats.skipped["empty"] += 1
        return None
    category, why = stats.notes.category(rec, cfg.category)
    if category is None:
        return _malformed(stats, f"{rec.where}: {why}")
    source_id = str(rec.record.get(cfg.id_key, rec.where))
    return Document(text, category, source_id)


def _malformed(stats: PreprocessStats, msg: str) -> None:
    stats.skipped["malformed"] += 1
    if len(stats.errors) < 1000:
        stats.errors.append(msg)
    log.warning("skipping malformed record %s", msg)
    return None


def documents(cfg: DataConfig, stats: PreprocessStats) -> Iterator[Document]:
    """Readable documents of data.paths, in order; everything else is counted in ``stats``."""
    for rec in iter_records(list(cfg.paths)):
        doc = _to_document(rec, cfg, stats)
        if doc is not None:
            yield doc
    stats.notes.log_summary()


# --- tokenisation workers -------------------------------------------------------------------------
_TOKENIZER = None

Cut = tuple[int, list[tuple[int, int]], list[str]]
"""(document tokens, window spans [start, end) in the document's tokens, window texts)."""


def _init_worker(tokenizer: Any) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = tokenizer


def _window_batch(args: tuple[list[str], int]) -> list[Cut]:
    """Tokenise documents (no BOS), cut windows, decode them back to text as the reference stores them."""
    texts, w = args
    tok = _TOKENIZER
    assert tok is not None
    out = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        spans = slide_windows(len(ids), w)
        out.append((len(ids), spans, tok.batch_decode([ids[a:b] for a, b in spans]) if spans else []))
    return out


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def _windowed(docs: Iterable[Document], tokenizer: Any, cfg: WindowConfig) -> Iterator[tuple[Document, Cut]]:
    """(document, its cut), in input order; tokenised by a pool of ``window.workers`` processes."""
    batches = _batches(docs, cfg.batch_docs)
    if cfg.workers <= 1:
        _init_worker(tokenizer)
        for b in batches:
            yield from zip(b, _window_batch(([d.text for d in b], cfg.length)), strict=True)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        # A bounded queue of tasks in flight, consumed in order: Pool.imap would read the whole corpus ahead.
        inflight: deque = deque()
        for b in batches:
            inflight.append((b, pool.apply_async(_window_batch, (([d.text for d in b], cfg.length),))))
            if len(inflight) >= 4 * cfg.workers:
                yield from _drain_one(inflight)
        while inflight:
            yield from _drain_one(inflight)


def _drain_one(inflight: deque) -> Iterator[tuple[Document, Cut]]:
    b, res = inflight.popleft()
    yield from zip(b, res.get(), strict=True)


# --- window records -------------------------------------------------------------------------------
def documents_of(records: Iterable[InputRecord], cfg: DataConfig, stats: PreprocessStats) -> Iterator[Document]:
    """Readable documents of some records (one pre-processing piece); the rest counted in ``stats``, as
    ``documents`` does for all of ``data.paths``."""
    for rec in records:
        doc = _to_document(rec, cfg, stats)
        if doc is not None:
            yield doc
    stats.notes.log_summary()


def window_record(doc: Document, text: str, index: int, span: tuple[int, int], doc_tokens: int,
                  w: int) -> dict[str, Any]:
    """A window before numbering; ``token_start``/``token_end`` place it in its document's tokens (no BOS):
    tokenising the document and decoding that range gives ``content``."""
    return {"content": text, "category": doc.category, "source_id": doc.source_id, "window_index": index,
            "token_start": span[0], "token_end": span[1], "n_tokens": w, "doc_tokens": doc_tokens}


def window_line(rec: dict[str, Any]) -> bytes:
    """One JSON Lines row as every window file of the stage writes it (UTF-8, not ASCII-escaped)."""
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


def write_windows(docs: Iterable[Document], tokenizer: Any, window: WindowConfig, out: BinaryIO,
                  stats: PreprocessStats,
                  on_document: Callable[[int, int], None] | None = None) -> list[tuple[int, str]]:
    """Cut ``docs`` by Algorithm 1 into windows written to ``out`` in input order, without ``data_id`` (the
    numbering pass adds it). Returns each window's (byte offset in ``out``, category); ``on_document``
    gets (windows, tokens) of every document, for progress."""
    w = window.length
    index: list[tuple[int, str]] = []
    for doc, (n, spans, texts) in _windowed(docs, tokenizer, window):
        stats.tokens_in[doc.category] += n
        if not texts:
            stats.skipped["exact_window" if n == w else "too_short"] += 1
        for i, (span, text) in enumerate(zip(spans, texts, strict=True)):
            index.append((out.tell(), doc.category))
            out.write(window_line(window_record(doc, text, i, span, n, w)))
            stats.windows[doc.category] += 1
            stats.tokens_windows[doc.category] += w
        if on_document is not None:
            on_document(len(texts), n)
    return index
