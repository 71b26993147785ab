"""Algorithm 1 (docs/method.md §1) branch by branch, and the streamed pre-processing with its counters."""

import gzip
import json
import random

import pytest

from longattn.selection.config import DataConfig, WindowConfig
from longattn.selection.windows import PreprocessStats, documents, slide_windows

W = 10


def literal_algorithm1(n, w):
    """The reference's sliding_window_sample on a list, as written in the paper's Algorithm 1."""
    data = list(range(n))
    seg = []
    if n < w:
        return seg
    left, right = 0, n
    while right - left > 3 * w:
        seg.append(data[left:left + w])
        left += w
        seg.append(data[right - w:right])
        right -= w
    rem = right - left
    if w < rem <= 2 * w:
        seg += [data[left:left + w], data[right - w:right]]
    elif 2 * w < rem <= 3 * w:
        m = left + (rem - w) // 2
        seg += [data[left:left + w], data[m:m + w], data[right - w:right]]
    return [(s[0], s[-1] + 1) for s in seg]


def test_short_and_exact_yield_nothing():
    assert slide_windows(W - 1, W) == []
    assert slide_windows(0, W) == []
    # n == W: Δ = W matches no branch in the reference, so nothing.
    assert slide_windows(W, W) == []


def test_two_windows_branch():
    assert slide_windows(W + 1, W) == [(0, W), (1, W + 1)]
    assert slide_windows(2 * W, W) == [(0, W), (W, 2 * W)]


def test_three_windows_branch_just_above_2w():
    n = 2 * W + 1
    mid = (n - W) // 2
    assert slide_windows(n, W) == [(0, W), (mid, mid + W), (n - W, n)]
    assert slide_windows(3 * W, W) == [(0, W), (W, 2 * W), (2 * W, 3 * W)]


def test_loop_branch_just_above_3w():
    n = 3 * W + 1
    # one pass of the loop (left and right windows), then Δ = W + 1: two more.
    assert slide_windows(n, W) == [(0, W), (n - W, n), (W, 2 * W), (n - 2 * W, n - W)]


def test_very_long_document_covers_and_stays_in_bounds():
    n = 1000 * W + 7
    spans = slide_windows(n, W)
    assert spans == literal_algorithm1(n, W)
    assert all(0 <= a < b <= n and b - a == W for a, b in spans)
    # every token is covered; the 7 extra tokens cost one overlapping window in the middle
    covered = set()
    for a, b in spans:
        covered.update(range(a, b))
    assert covered == set(range(n))
    assert len(spans) == 1001


@pytest.mark.parametrize("n", list(range(0, 8 * W + 3)) + [random.Random(0).randrange(10**5) for _ in range(50)])
def test_matches_literal(n):
    assert slide_windows(n, W) == literal_algorithm1(n, W)


def test_documents_counts_bad_input(tmp_path):
    p = tmp_path / "in.jsonl.gz"
    lines = [json.dumps({"content": "hello world", "category": "book", "id": "d1"}),
             "{not json",
             json.dumps({"content": ""}),
             json.dumps({"content": 3}),
             json.dumps({"other": "x"}),
             "",
             "key7\t" + json.dumps({"content": "tab separated"}),
             json.dumps(["a", "list"])]
    with gzip.open(p, "wt") as f:
        f.write("\n".join(lines) + "\n")
    stats = PreprocessStats()
    docs = list(documents(DataConfig(paths=[str(p)], category="arxiv"), stats))
    assert [(d.text, d.category, d.source_id) for d in docs] == [
        ("hello world", "book", "d1"), ("tab separated", "arxiv", "key7")]
    assert stats.skipped == {"malformed": 4, "empty": 1}
    assert stats.documents == 7
    # The message names the file and line to fix.
    assert any(e.startswith(f"{p}:2:") and "bad JSON" in e for e in stats.errors)
    assert any(f"{p}:4:" in e and "'content'" in e for e in stats.errors)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.paths"):
        list(documents(DataConfig(paths=[str(tmp_path / "nope.jsonl")]), PreprocessStats()))


def test_window_config_defaults():
    assert WindowConfig().length == 32768
