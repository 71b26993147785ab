"""Training data: JSON Lines -> megatron indexed datasets (.bin/.idx) per source -> a weighted blend.

Sources are the categories of a ``longattn-select`` run (``selected.jsonl``: arxiv, book, code) and the
short-context files of ``data.short`` (wiki, github, web). Documents stream through a pool of tokeniser
processes in order; each gets the end-of-document token that GPTDataset packs sequences on.
A finished source is marked with ``<prefix>.done.json`` and skipped on rerun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from longattn.common.io import iter_records, read_jsonl
from longattn.common.models import ModelConfig
from train.config import DataMixConfig, short_sources

log = logging.getLogger(__name__)

_TOKENIZER: Any = None


def blend_weights(weights: dict[str, float], present: Iterable[str]) -> dict[str, float]:
    """Table 7 weights restricted to the sources present, renormalised to sum to 1."""
    present = [s for s in present if weights.get(s, 0.0) > 0]
    if not present:
        raise ValueError(f"no source with a positive weight among {list(present)} (data.weights={weights})")
    total = sum(weights[s] for s in present)
    return {s: weights[s] / total for s in present}


def _init_worker(model_cfg: ModelConfig) -> None:
    global _TOKENIZER
    from longattn.common.models import load_tokenizer

    _TOKENIZER = load_tokenizer(model_cfg)


def _tokenize(texts: list[str]) -> list[list[int]]:
    eos = _TOKENIZER.eos_token_id
    ids = _TOKENIZER(texts, add_special_tokens=False)["input_ids"]
    return [x + [eos] for x in ids]


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _texts(path: str, text_key: str, category: str | None) -> Iterator[str]:
    for rec in iter_records([path]):
        r = rec.record
        if r is None:  # a bad line: counted by the selection stage, skipped here
            continue
        if category is not None and r.get("category") != category:
            continue
        text = r.get(text_key, r.get("text"))
        if text:
            yield text


def selected_categories(selected_dir: str) -> list[str]:
    """Categories present in ``selected.jsonl`` (one pass over the ids, not the texts kept)."""
    cats: dict[str, None] = {}
    for r in read_jsonl(Path(selected_dir) / "selected.jsonl"):
        cats.setdefault(r.get("category", "default"))
    return list(cats)


class _InProcess:
    """``pool.imap`` in this process (``data.workers=0``): no start-up cost for small test corpora."""

    def __init__(self, model_cfg: ModelConfig):
        _init_worker(model_cfg)

    def imap(self, fn: Callable, items: Iterable) -> Iterator:
        return map(fn, items)


def _fingerprint(path: str, category: str | None, model_cfg: ModelConfig) -> dict[str, Any]:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "category": category, "tokenizer": model_cfg.tokenizer or model_cfg.path}


def build_source(name: str, path: str, category: str | None, out: Path, pool: Any, text_key: str,
                 fingerprint: dict[str, Any], vocab_size: int) -> None:
    """Tokenise one source into ``out/<name>.bin/.idx`` (documents stream through ``pool`` in order)."""
    from train.megatron_backend import IndexedWriter

    prefix = out / name
    writer, docs, tokens = IndexedWriter(prefix, vocab_size), 0, 0
    for ids in pool.imap(_tokenize, _batches(_texts(path, text_key, category), 64)):
        for x in ids:
            writer.add(x)
            docs, tokens = docs + 1, tokens + len(x)
    writer.finalize()
    # Written last: a source interrupted mid-way has no marker and is rebuilt on rerun.
    prefix.with_suffix(".done.json").write_text(
        json.dumps({"fingerprint": fingerprint, "documents": docs, "tokens": tokens}))
    log.info("data: %s -> %s.bin (%d documents, %d tokens)", name, prefix, docs, tokens)


def _is_done(prefix: Path, fingerprint: dict[str, Any]) -> bool:
    done = prefix.with_suffix(".done.json")
    return done.is_file() and json.loads(done.read_text()).get("fingerprint") == fingerprint


def build_sources(cfg: DataMixConfig, model_cfg: ModelConfig, out: Path, vocab_size: int) -> dict[str, str]:
    """All sources -> indexed datasets: name -> prefix (selected categories first, then short sources).

    Sources already built from the same file and tokenizer are skipped.
    """
    todo: dict[str, tuple[str, str | None]] = {}
    if cfg.selected:
        sel = str(Path(cfg.selected) / "selected.jsonl")
        todo |= {cat: (sel, cat) for cat in selected_categories(cfg.selected)}
    todo |= {name: (path, None) for name, path in short_sources(cfg).items()}
    prints = {name: _fingerprint(path, cat, model_cfg) for name, (path, cat) in todo.items()}
    missing = [n for n in todo if not _is_done(out / n, prints[n])]
    if missing:
        out.mkdir(parents=True, exist_ok=True)
        # spawn, not fork: the parent already runs torch threads.
        pool_cm = (mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker, initargs=(model_cfg,))
                   if cfg.workers > 0 else contextlib.nullcontext(_InProcess(model_cfg)))
        with pool_cm as pool:
            for name in missing:
                path, cat = todo[name]
                build_source(name, path, cat, out, pool, cfg.text_key, prints[name], vocab_size)
    return {name: str(out / name) for name in todo}
