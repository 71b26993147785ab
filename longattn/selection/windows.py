"""Pre-processing (docs/method.md §1, paper Algorithm 1): documents -> 32k-token windows, streamed and counted."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from longattn.common.io import InputRecord, atomic_writer, iter_records
from longattn.selection.config import DataConfig, WindowConfig
from longattn.selection.records import InputNotes

log = logging.getLogger(__name__)

__all__ = ["slide_windows", "Document", "PreprocessStats", "documents", "preprocess"]


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


def _init_worker(tokenizer: Any) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = tokenizer


def _window_batch(args: tuple[list[str], int]) -> list[tuple[int, list[str]]]:
    """Tokenise documents (no BOS), cut windows, decode them back to text as the reference stores them."""
    texts, w = args
    tok = _TOKENIZER
    assert tok is not None
    out = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        spans = slide_windows(len(ids), w)
        out.append((len(ids), tok.batch_decode([ids[a:b] for a, b in spans]) if spans else []))
    return out


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def _windowed(docs: Iterable[Document], tokenizer: Any, cfg: WindowConfig) -> Iterator[tuple[Document, int, list[str]]]:
    """(document, n_tokens, window texts), in input order; tokenised by a pool of processes."""
    batches = _batches(docs, cfg.batch_docs)
    if cfg.workers <= 1:
        _init_worker(tokenizer)
        for b in batches:
            for d, (n, ws) in zip(b, _window_batch(([d.text for d in b], cfg.length)), strict=True):
                yield d, n, ws
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


def _drain_one(inflight: deque) -> Iterator[tuple[Document, int, list[str]]]:
    b, res = inflight.popleft()
    for d, (n, ws) in zip(b, res.get(), strict=True):
        yield d, n, ws


def _window_record(doc: Document, text: str, index: int, n_tokens: int, w: int) -> dict[str, Any]:
    return {"content": text, "category": doc.category, "source_id": doc.source_id,
            "window_index": index, "n_tokens": w, "doc_tokens": n_tokens}


def _line(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


def _format_id(prefix: str, category: str, counters: Counter) -> str:
    p = prefix.format(category=category)
    counters[p] += 1
    return p + str(counters[p]).zfill(7)


def preprocess(data: DataConfig, window: WindowConfig, tokenizer: Any, out_dir: Path) -> PreprocessStats:
    """Write ``windows.jsonl`` (reference format + category, source_id, n_tokens) atomically."""
    stats = PreprocessStats()
    w = window.length
    sampling = window.sample_size is not None
    target = out_dir / ("windows.raw.jsonl" if sampling else "windows.jsonl")
    offsets: dict[str, list[int]] = {}
    counters: Counter = Counter()
    with atomic_writer(target, "wb") as f:
        for doc, n, texts in _windowed(documents(data, stats), tokenizer, window):
            stats.tokens_in[doc.category] += n
            if not texts:
                stats.skipped["exact_window" if n == w else "too_short"] += 1
                continue
            for i, text in enumerate(texts):
                rec = _window_record(doc, text, i, n, w)
                if sampling:
                    offsets.setdefault(doc.category, []).append(f.tell())
                else:
                    rec = {"data_id": _format_id(window.id_prefix, doc.category, counters), **rec}
                f.write(_line(rec))
                stats.windows[doc.category] += 1
                stats.tokens_windows[doc.category] += w
    if sampling:
        _write_sample(target, offsets, window, out_dir / "windows.jsonl", stats)
        target.unlink()
    return stats


def _write_sample(raw: Path, offsets: dict[str, list[int]], window: WindowConfig, out: Path,
                  stats: PreprocessStats) -> None:
    """The reference's ``random.sample`` with seed 12, per category, streamed through byte offsets.

    ``random.sample`` draws indices from the population size only, so sampling ``range(n)`` picks the
    same windows, in the same order, as sampling the list of windows itself.
    """
    counters: Counter = Counter()
    with open(raw, "rb") as src, atomic_writer(out, "wb") as f:
        for category, offs in offsets.items():
            k = window.sample_size or 0
            picks = range(len(offs)) if k >= len(offs) else random.Random(window.sample_seed).sample(range(len(offs)), k)
            stats.sampled_out[category] = len(offs) - len(picks)
            for j in picks:
                src.seek(offs[j])
                rec = json.loads(src.readline())
                f.write(_line({"data_id": _format_id(window.id_prefix, category, counters), **rec}))
