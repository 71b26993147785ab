"""The ProLong baseline (Chen et al. 2024; docs/method.md §4): long-dependency score from chunk perplexities.

Per window: 128-token chunks; ``single_ppl[i]`` = perplexity of chunk i alone, ``pair_ppl[i][j]`` = of
chunk i after chunk j (j < i); the dependency strength ``(single - pair) / single`` above a threshold plus a
distance gain, weighted by the dependency specificity of row i, summed over pairs.

Speed, without changing the result: the chunk and pair forwards of all windows in a scoring call are batched
together, and a pair forward reuses the key/value cache of chunk j from its single-chunk forward (a causal
LM's states of ``[j, i]`` at positions of j do not depend on i), so each pair costs 128 new tokens, not 256.
``kv_reuse=false`` runs the literal ``[j, i]`` forwards instead.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longattn.common.errors import Choice, ConfigError
from longattn.common.models import ModelConfig, load_causal_lm, load_tokenizer
from longattn.selection.config import ScorerConfig
from longattn.selection.scorers import device_name, register_scorer

log = logging.getLogger(__name__)

__all__ = ["ProLongScorerConfig", "ProLongScorer", "split_chunks", "sample_pairs", "dependency_specificity",
           "prolong_lds"]


class PairRng(Choice):
    fixed = "fixed"
    """A fresh ``random.Random(seed)`` per window: the reference's draws for a window it scores first."""
    window = "window"
    """Seeded by seed and data_id: different pairs per window, still reproducible."""


@dataclass
class ProLongScorerConfig(ScorerConfig):
    name: str = "prolong"
    """Registry key of the scorer."""
    chunk_size: int = 128
    """Tokens per chunk (the reference: 128); the last partial chunk of a window is dropped."""
    threshold: float = 0.1
    """Pairs count when the relative perplexity drop (single - pair) / single exceeds this (reference: 0.1)."""
    sample_size: int = 500
    """Pairs (i, j) evaluated per window, sampled at random; -1 (or 0) = all pairs. As the reference, a window
    with fewer pairs than this is not pair-scored at all and gets LDS = 0 (at 2048 tokens: 120 pairs)."""
    seed: int = 11
    """Seed of the chunk and pair sampling (Python ``random``, as the reference)."""
    pair_rng: PairRng = PairRng.fixed
    """``fixed``: a fresh ``random.Random(seed)`` per window: the reference's draws for a window it scores
    first, independent of order, sharding and resume (windows with equal chunk counts share their pairs);
    ``window``: seeded by seed and data_id (different pairs per window, still reproducible)."""
    truncate: bool = True
    """Score the first window.length tokens of the content; false = all of it, with window.length/chunk_size
    chunks sampled keeping order when there are more (the reference on whole documents)."""
    forward_batch: int = 8
    """Chunk sequences per forward pass (single-chunk and pair forwards alike)."""
    kv_reuse: bool = True
    """Pair forwards reuse chunk j's KV cache from its single-chunk forward (exact for causal LMs);
    false = literal forwards of the concatenation [j, i] as the reference."""
    batch_size: int = 4
    """Windows per scoring call (their forwards are batched together)."""

    def validate(self, length: int) -> None:
        if self.chunk_size < 2:
            raise ConfigError(f"scorer.chunk_size={self.chunk_size} must be >= 2 (a chunk's loss needs 2 tokens)")
        if length // self.chunk_size < 2:
            raise ConfigError(f"window.length={length} must hold at least 2 chunks of scorer.chunk_size="
                             f"{self.chunk_size} (the distance scale divides by chunk_num - 1)")
        if self.sample_size < -1:
            raise ConfigError(f"scorer.sample_size={self.sample_size}: use -1 (all pairs) or a positive count")
        if self.forward_batch < 1 or self.batch_size < 1:
            raise ConfigError("scorer.forward_batch and scorer.batch_size must be >= 1")


# --- the formula (pure) -----------------------------------------------------------------------------
def split_chunks(ids: Sequence[int], chunk_size: int, chunk_num: int, rng: random.Random) -> list[list[int]]:
    """Full chunks of ``ids``; more than ``chunk_num`` are sampled keeping their order (the reference)."""
    chunks = [list(ids[i : i + chunk_size]) for i in range(0, len(ids) - chunk_size + 1, chunk_size)]
    if len(chunks) > chunk_num:
        keep = sorted(rng.sample(range(len(chunks)), chunk_num))
        chunks = [chunks[i] for i in keep]
    return chunks


def sample_pairs(n_chunks: int, sample_size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Pairs (i, j), j < i, to evaluate. ``sample_size <= 0``: all. Fewer pairs than ``sample_size``: none
    (the reference returns before sampling, so such a window scores 0)."""
    pairs = [(i, j) for i in range(n_chunks) for j in range(i)]
    if sample_size <= 0:
        return pairs
    if len(pairs) < sample_size:
        return []
    return rng.sample(pairs, sample_size)


def dependency_specificity(row: np.ndarray) -> float:
    """DE of one row of raw perplexity drops: ``clip((log m - H(softmax(row))) / log m, 0, 1)``, 1 if m = 1.

    A row whose gain is concentrated on few earlier chunks is specific (DE near 1); a flat row is not.
    As the reference, zero probabilities get 1e-12 before the entropy.
    """
    row = np.asarray(row, dtype=np.float64)
    m = row.size
    if m == 1:
        return 1.0
    p = np.exp(row - row.max())
    p /= p.sum()
    if (p == 0).any():
        p = (p + 1e-12) / (p + 1e-12).sum()
    entropy = -np.sum(p * np.log(p))
    return float(np.clip((math.log(m) - entropy) / math.log(m), 0.0, 1.0))


def prolong_lds(single_ppl: np.ndarray, pair_ppl: np.ndarray, *, threshold: float, chunk_num: int,
                ) -> dict[str, Any]:
    """LDS of one window from ``single_ppl`` [n] and ``pair_ppl`` [n, n] (+inf where not evaluated).

    ``chunk_num`` sets the distance scale 1 / (chunk_num - 1), from the window length as the reference (not
    from the chunks present). A NaN score becomes 0. Returns the score and its intermediate quantities.
    """
    single = np.asarray(single_ppl, dtype=np.float64)
    pair = np.asarray(pair_ppl, dtype=np.float64)
    n = single.size
    lower = np.tril(np.ones((n, n), dtype=bool), k=-1)
    with np.errstate(invalid="ignore"):
        dlt = np.where(lower, single[:, None] - pair, 0.0)
    evaluated = lower & (pair != np.inf)
    de = np.array([dependency_specificity(dlt[i, evaluated[i]]) if evaluated[i].any() else 0.0
                   for i in range(n)])
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = dlt / single[:, None]
        strong = lower & (rel > threshold)
    i_idx, j_idx = np.nonzero(strong)
    gain = np.clip((i_idx - j_idx) / (chunk_num - 1), 0.0, 1.0)
    lds = float(np.sum((rel[i_idx, j_idx] + gain) * de[i_idx]))
    if math.isnan(lds):
        lds = 0.0
    return {"lds": lds, "n_pairs": int(evaluated.sum()), "n_dependent": int(strong.sum()),
            "dependency_specificity": de, "relative_drop": np.where(evaluated, rel, np.nan)}


# --- the scorer -------------------------------------------------------------------------------------
@dataclass
class _Window:
    chunks: list[list[int]]
    pairs: list[tuple[int, int]]
    n_scored: int
    single: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pair: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


def _chunk_ppl(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """exp(mean CE) per row: logits [B, T, V] predict targets [B, T] (the reference's compute_ppl)."""
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return ce.view(targets.shape).mean(-1).exp()


@register_scorer("prolong", ProLongScorerConfig)
class ProLongScorer:
    """ProLong's LDS per window; ``ds`` = the LDS (ranked alone: ``var`` = 0)."""

    def __init__(self, cfg: ProLongScorerConfig, model_cfg: ModelConfig, length: int):
        t0 = time.perf_counter()
        self.cfg, self.length = cfg, length
        self.chunk_num = length // cfg.chunk_size
        self.tokenizer = load_tokenizer(model_cfg)
        self.model = load_causal_lm(model_cfg, len(self.tokenizer))
        self.device_ = next(self.model.parameters()).device
        self.load_seconds = time.perf_counter() - t0

    @property
    def device(self) -> str:
        return device_name(self.device_)

    def prepare(self, windows: list[dict[str, Any]]) -> list[_Window]:
        """Chunks and sampled pairs of each window, made in the pipeline's tokenising thread."""
        return [self._window(w) for w in windows]

    def _window(self, w: dict[str, Any]) -> _Window:
        ids = self.tokenizer(w["content"], add_special_tokens=False)["input_ids"]
        if self.cfg.truncate:
            ids = ids[: self.length]
        seed: Any = self.cfg.seed if self.cfg.pair_rng == PairRng.fixed else f"{self.cfg.seed}/{w['data_id']}"
        rng = random.Random(seed)
        chunks = split_chunks(ids, self.cfg.chunk_size, self.chunk_num, rng)
        return _Window(chunks, sample_pairs(len(chunks), self.cfg.sample_size, rng), len(ids))

    @torch.inference_mode()
    def score(self, windows: list[dict[str, Any]], prepared: list[_Window]) -> list[dict[str, Any]]:
        wins = prepared
        self._perplexities(wins)
        rows = []
        for w, win in zip(windows, wins, strict=True):
            res = prolong_lds(win.single, win.pair, threshold=self.cfg.threshold, chunk_num=self.chunk_num)
            finite = win.pair[np.isfinite(win.pair)]
            rows.append({
                "data_id": w["data_id"], "category": w["category"],
                "n_tokens": int(w.get("n_tokens") or win.n_scored), "n_scored": win.n_scored,
                "ds": res["lds"], "var": 0.0, "prolong_lds": res["lds"],
                "n_chunks": len(win.chunks), "n_pairs": res["n_pairs"], "n_dependent": res["n_dependent"],
                "mean_single_ppl": float(win.single.mean()) if win.single.size else None,
                "mean_pair_ppl": float(finite.mean()) if finite.size else None,
                "mean_specificity": float(res["dependency_specificity"].mean()) if win.single.size else None,
            })
        return rows

    def _perplexities(self, wins: list[_Window]) -> None:
        """Fill ``single`` and ``pair`` of every window, batching forwards across windows."""
        for win in wins:
            n = len(win.chunks)
            win.single, win.pair = np.zeros(n), np.full((n, n), np.inf)
        flat = [(w, c) for w, win in enumerate(wins) for c in range(len(win.chunks))]
        if not flat:  # no window holds a full chunk (the reference fails on them and scores 0)
            return
        gid = {key: g for g, key in enumerate(flat)}
        tokens = torch.tensor([wins[w].chunks[c] for w, c in flat], dtype=torch.long)
        # Pairs grouped by the global index of chunk j: each group runs right after j's single forward.
        by_j: dict[int, list[tuple[int, int, int]]] = {}
        for w, win in enumerate(wins):
            for i, j in win.pairs:
                by_j.setdefault(gid[(w, j)], []).append((w, i, j))
        fb = self.cfg.forward_batch
        for start in range(0, len(flat), fb):
            ids = tokens[start : start + fb].to(self.device_)
            out = self.model(input_ids=ids, use_cache=self.cfg.kv_reuse)
            ppl = _chunk_ppl(out.logits[:, :-1], ids[:, 1:]).cpu().numpy()
            for k, (w, c) in enumerate(flat[start : start + fb]):
                wins[w].single[c] = ppl[k]
            todo = [(g - start, w, i, j) for g in range(start, start + len(ids)) for w, i, j in by_j.get(g, [])]
            for part in _batches(todo, fb):
                self._pair_forward(part, wins, tokens, gid, out.past_key_values if self.cfg.kv_reuse else None,
                                   start)

    def _pair_forward(self, part: Sequence[tuple[int, int, int, int]], wins: list[_Window], tokens: torch.Tensor,
                      gid: dict[tuple[int, int], int], cache: Any, start: int) -> None:
        from transformers import DynamicCache

        gi = torch.tensor([gid[(w, i)] for _, w, i, _ in part])
        chunk_i = tokens[gi].to(self.device_)
        if cache is not None:
            # Chunk i on top of chunk j's cached keys/values: positions continue after j, as in [j, i].
            rows = torch.tensor([r for r, *_ in part], device=self.device_)
            past = DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
                                                for layer in cache.layers])
            logits = self.model(input_ids=chunk_i, past_key_values=past, use_cache=True).logits[:, :-1]
        else:
            gj = torch.tensor([start + r for r, *_ in part])
            ids = torch.cat([tokens[gj].to(self.device_), chunk_i], dim=1)
            logits = self.model(input_ids=ids).logits[:, chunk_i.shape[1] : -1]
        ppl = _chunk_ppl(logits, chunk_i[:, 1:]).cpu().numpy()
        for k, (_, w, i, j) in enumerate(part):
            wins[w].pair[i, j] = ppl[k]
