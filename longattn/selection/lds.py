"""Combination and selection (docs/method.md §3): pure functions over arrays of one category."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = ["normalize", "lds_scores", "rank", "keep_mask", "keep_mask_disjoint", "duplicated_tokens", "threshold"]


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


def _budget(n: int, fraction: float | None, tokens: float | None) -> tuple[int | None, int | None]:
    """(max windows, max tokens): exactly one is set, as in ``keep_mask``."""
    if tokens is not None:
        return None, int(float(tokens))
    if fraction is not None:
        return math.floor(n * float(fraction) + 1e-9), None
    raise ValueError("set select.fraction or select.tokens")


def keep_mask_disjoint(
    scores: np.ndarray,
    n_tokens: np.ndarray,
    docs: Sequence[Hashable | None],
    starts: Sequence[int | None],
    ends: Sequence[int | None],
    *,
    fraction: float | None = None,
    tokens: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, skipped for overlap): the budget of ``keep_mask`` filled in rank order, never keeping two
    windows of one document whose token ranges [start, end) overlap (``select.overlap=drop``).

    A window that overlaps a better kept window of its document is skipped and the next-best takes its
    place; ``fraction`` counts over all windows, ``tokens`` stops at the first window that does not fit (as
    ``keep_mask``). A window with ``docs[i] is None`` (no offsets known) overlaps nothing.
    """
    order = rank(scores)
    n_tok = np.asarray(n_tokens, dtype=np.int64)
    max_windows, max_tokens = _budget(len(order), fraction, tokens)
    keep = np.zeros(len(order), dtype=bool)
    skipped = np.zeros(len(order), dtype=bool)
    kept_spans: dict[Hashable, list[tuple[int, int]]] = defaultdict(list)
    used = count = 0
    for i in order:
        if max_windows is not None and count >= max_windows:
            break
        doc = docs[i]
        if doc is not None and any(a < ends[i] and starts[i] < b for a, b in kept_spans[doc]):
            skipped[i] = True
            continue
        if max_tokens is not None:
            if used + n_tok[i] > max_tokens:
                break
            used += int(n_tok[i])
        keep[i] = True
        count += 1
        if doc is not None:
            kept_spans[doc].append((int(starts[i]), int(ends[i])))
    return keep, skipped


def duplicated_tokens(docs: Sequence[Hashable | None], starts: Sequence[int | None], ends: Sequence[int | None],
                      keep: np.ndarray) -> int:
    """Tokens of the kept windows that another kept window of the same document also holds: the sum of
    the kept windows' lengths minus the length of their union, per document (0 = no text repeated)."""
    spans: dict[Hashable, list[tuple[int, int]]] = defaultdict(list)
    for i in np.flatnonzero(keep):
        if docs[i] is not None:
            spans[docs[i]].append((int(starts[i]), int(ends[i])))
    dup = 0
    for intervals in spans.values():
        intervals.sort()
        reach = intervals[0][0]
        for a, b in intervals:
            dup += max(0, min(b, reach) - a)
            reach = max(reach, b)
    return dup


def threshold(scores: np.ndarray, keep: np.ndarray) -> float | None:
    """Lowest kept score: the selection threshold marked in reports (None if nothing kept)."""
    return float(np.min(scores[keep])) if keep.any() else None
