"""The Random baseline (docs/method.md §5): uniform random windows to the same per-category token budget, seeded.

Each window's score is a uniform number drawn from (seed, data_id) alone, so the choice does not depend on
input order, sharding or resume; ranking by it and taking windows while they fit the budget (the shared
``keep_mask``) is a uniform random choice of windows. (Named ``random_scorer`` so that no module of the
package is called ``random``.)
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from longattn.common.errors import ConfigError
from longattn.common.models import ModelConfig
from longattn.selection.config import ScorerConfig
from longattn.selection.lds import keep_mask
from longattn.selection.scorers import register_scorer

__all__ = ["RandomScorerConfig", "RandomScorer", "window_uniform", "budgeted_random_choice"]


@dataclass
class RandomScorerConfig(ScorerConfig):
    name: str = "random"
    """Registry key of the scorer."""
    seed: int = 11
    """Seed of the choice: the same seed and data_ids give the same windows."""
    batch_size: int = 256
    """Windows per scoring call (no model: only journaling granularity)."""

    def validate(self, length: int) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"scorer.batch_size={self.batch_size} must be >= 1")


def window_uniform(seed: int, data_id: str) -> float:
    """A uniform number in [0, 1) determined by (seed, data_id) alone (53 bits of a SHA-256)."""
    digest = hashlib.sha256(f"{seed}\0{data_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


def budgeted_random_choice(data_ids: list[str], n_tokens: np.ndarray, *, seed: int, fraction: float | None = None,
                           tokens: float | None = None) -> np.ndarray:
    """Mask of a seeded uniform random choice of windows: ``fraction`` of them, or windows in random order
    while their tokens fit ``tokens`` (what the pipeline does with this scorer's rows)."""
    scores = np.array([window_uniform(seed, d) for d in data_ids])
    return keep_mask(scores, np.asarray(n_tokens), fraction=fraction, tokens=tokens)


@register_scorer("random", RandomScorerConfig)
class RandomScorer:
    """``ds`` = the window's uniform number, ``var`` = 0: the pipeline's selection is then a random choice."""

    def __init__(self, cfg: RandomScorerConfig, model_cfg: ModelConfig, length: int):
        t0 = time.perf_counter()
        self.cfg, self.model_cfg, self.length = cfg, model_cfg, length
        self._tokenizer: Any = None  # only for windows without n_tokens (pre-processed inputs)
        self.load_seconds = time.perf_counter() - t0

    def _n_tokens(self, w: dict[str, Any]) -> int:
        if w.get("n_tokens"):
            return int(w["n_tokens"])
        if self._tokenizer is None:
            from longattn.common.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_cfg)
        # The budget counts what a scorer would see: at most window.length tokens.
        return min(len(self._tokenizer(w["content"], add_special_tokens=False)["input_ids"]), self.length)

    device = "cpu"
    """No model: hashing only."""

    def prepare(self, windows: list[dict[str, Any]]) -> None:
        """Nothing to prepare: the window's number comes from its data_id."""

    def score(self, windows: list[dict[str, Any]], prepared: None = None) -> list[dict[str, Any]]:
        rows = []
        for w in windows:
            n = self._n_tokens(w)
            u = window_uniform(self.cfg.seed, str(w["data_id"]))
            rows.append({"data_id": w["data_id"], "category": w["category"], "n_tokens": n, "n_scored": n,
                         "ds": u, "var": 0.0, "random_score": u})
        return rows
