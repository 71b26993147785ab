"""Combination and selection (docs/method.md §3): pure functions over arrays of one category."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["normalize", "lds_scores", "rank", "keep_mask", "threshold"]


def normalize(x: np.ndarray, method: str) -> np.ndarray:
    """``zscore`` (the paper; sample std as the reference's ``statistics.stdev``) or ``minmax`` (the
    reference code; all-equal values map to 0.5 as its ``standardize01``)."""
    x = np.asarray(x, dtype=np.float64)
    if method == "minmax":
        lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)
        return np.full_like(x, 0.5) if hi == lo else (x - lo) / (hi - lo)
    if method == "zscore":
        if x.size < 2:
            return np.zeros_like(x)
        sd = x.std(ddof=1)
        return np.zeros_like(x) if sd == 0 else (x - x.mean()) / sd
    raise ValueError(f"select.normalize={method!r}: use zscore or minmax")


def lds_scores(ds: np.ndarray, var: np.ndarray, *, alpha: float = 0.5, method: str = "zscore") -> np.ndarray:
    """LDS = norm(DS) + alpha * norm(DU) with DU = -Var, i.e. norm(DS) - alpha * norm(Var)."""
    return normalize(ds, method) - alpha * normalize(var, method)


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties keep input order (the reference's stable ``sorted``)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def keep_mask(
    scores: np.ndarray,
    n_tokens: np.ndarray,
    *,
    fraction: float | None = None,
    tokens: float | None = None,
) -> np.ndarray:
    """Boolean mask of kept windows.

    ``fraction``: the top floor(n * fraction) windows (the reference keeps ``len // 2``).
    ``tokens``: the best windows, in rank order, while their tokens fit the budget.
    """
    order = rank(scores)
    keep = np.zeros(len(order), dtype=bool)
    if tokens is not None:
        cum = np.cumsum(np.asarray(n_tokens, dtype=np.int64)[order])
        keep[order[cum <= int(float(tokens))]] = True
    elif fraction is not None:
        keep[order[: math.floor(len(order) * float(fraction) + 1e-9)]] = True
    else:
        raise ValueError("set select.fraction or select.tokens")
    return keep


def threshold(scores: np.ndarray, keep: np.ndarray) -> float | None:
    """Lowest kept score: the selection threshold marked in reports (None if nothing kept)."""
    return float(np.min(scores[keep])) if keep.any() else None
