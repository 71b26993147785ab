"""LDS combination, both normalisations and budgets (docs/method.md §3)."""

import statistics

import numpy as np
import pytest

from longattn.selection.lds import keep_mask, lds_scores, normalize, rank, threshold


def test_zscore_matches_statistics_stdev():
    x = [0.3, 0.5, 0.1, 0.9, 0.4]
    mu, sd = statistics.mean(x), statistics.stdev(x)
    np.testing.assert_allclose(normalize(np.array(x), "zscore"), [(v - mu) / sd for v in x], rtol=1e-12)


def test_minmax_matches_reference_and_constant_is_half():
    x = np.array([2.0, 4.0, 3.0])
    np.testing.assert_allclose(normalize(x, "minmax"), [0.0, 1.0, 0.5])
    np.testing.assert_allclose(normalize(np.array([7.0, 7.0]), "minmax"), [0.5, 0.5])
    np.testing.assert_allclose(normalize(np.array([7.0, 7.0]), "zscore"), [0.0, 0.0])


def test_lds_reference_formula():
    ds = np.array([0.2, 0.4, 0.3])
    var = np.array([1e-6, 3e-6, 2e-6])
    # reference: mm(DS) - 0.5 * mm(Var)
    np.testing.assert_allclose(lds_scores(ds, var, alpha=0.5, method="minmax"), [0.0, 0.5, 0.25])
    # paper: z(DS) + alpha * z(-Var); alpha = 0 ranks by DS alone (Table 4 "w/o DU")
    np.testing.assert_allclose(lds_scores(ds, var, alpha=0.0), normalize(ds, "zscore"))
    np.testing.assert_allclose(lds_scores(ds, var, alpha=1.0), normalize(ds, "zscore") + normalize(-var, "zscore"))


def test_rank_is_stable_like_sorted():
    s = np.array([1.0, 3.0, 3.0, 2.0, 1.0])
    ref = sorted(range(len(s)), key=lambda i: s[i], reverse=True)
    assert rank(s).tolist() == ref == [1, 2, 3, 0, 4]


def test_fraction_is_reference_half():
    s = np.arange(7.0)
    keep = keep_mask(s, np.ones(7), fraction=0.5)
    assert keep.tolist() == [False] * 4 + [True] * 3  # 7 // 2 = 3 best
    assert threshold(s, keep) == 4.0
    assert keep_mask(s, np.ones(7), fraction=0.0).sum() == 0
    assert keep_mask(s, np.ones(7), fraction=1.0).all()
    assert keep_mask(np.arange(100.0), np.ones(100), fraction=0.29).sum() == 29


def test_token_budget():
    s = np.array([0.1, 0.9, 0.5, 0.7])
    n = np.array([100, 100, 100, 100])
    assert keep_mask(s, n, tokens=250).tolist() == [False, True, False, True]
    assert keep_mask(s, n, tokens=300).tolist() == [False, True, True, True]
    assert keep_mask(s, n, tokens="1e3").all()
    assert not keep_mask(s, n, tokens=99).any()
    assert threshold(s, keep_mask(s, n, tokens=99)) is None


def test_budget_stops_at_first_window_that_does_not_fit():
    s = np.array([3.0, 2.0, 1.0])
    n = np.array([100, 500, 50])
    assert keep_mask(s, n, tokens=200).tolist() == [True, False, False]


def test_needs_a_rule():
    with pytest.raises(ValueError):
        keep_mask(np.ones(2), np.ones(2))
