"""Tests for longattn.selection.report: files written, PNG valid, Markdown numbers/order/escaping right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from longattn.selection.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    # "book": 20 windows, LDS = i / 10 so the order is known; the top half is kept
    for i in range(20):
        rows.append(
            dict(
                data_id=f"book-{i}",
                category="book",
                ds=float(rng.uniform(0.2, 0.9)),
                var=float(rng.uniform(1e-7, 1e-5)),
                lds=i / 10,
                kept=i >= 10,
                n_tokens=100 + i,
                first_line=f"line {i}",
            )
        )
    # "code": all-equal values, none kept, one first_line full of table-breaking characters
    for i in range(4):
        rows.append(
            dict(
                data_id=f"code-{i}",
                category="code",
                ds=0.5,
                var=2e-6,
                lds=0.25,
                kept=False,
                n_tokens=50,
                first_line="a | b `c` \\" + "x" * 200 if i == 0 else "",
            )
        )
    # "solo": a single kept row with a multi-line first_line
    rows.append(
        dict(
            data_id="solo-0",
            category="solo",
            ds=0.123456,
            var=3.3e-7,
            lds=-1.5,
            kept=True,
            n_tokens=7,
            first_line="first\nsecond | part",
        )
    )
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    rows = _rows()
    out = tmp_path_factory.mktemp("rep") / "nested"
    png, md = write_report(iter(rows), out, top_k=3, title="Test run")  # generator: must be single-pass
    return png, md, rows


def _table_rows(text: str, heading: str) -> list[str]:
    """The data rows (no header/separator) of the first table after `heading`."""
    lines = text.split(heading, 1)[1].lstrip("\n").splitlines()
    table: list[str] = []
    for ln in lines:
        if not ln.startswith("|"):
            break
        table.append(ln)
    return table[2:]


def _unescaped_pipes(line: str) -> int:
    n, i = 0, 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        n += line[i] == "|"
        i += 1
    return n


def test_files_exist_and_png_valid(report: tuple[Path, Path, list[dict]]) -> None:
    png, md, _ = report
    assert png.name == "report.png" and md.name == "report.md"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000
    assert md.read_text(encoding="utf-8").startswith("# Test run")


def test_summary_counts_and_means(report: tuple[Path, Path, list[dict]]) -> None:
    _, md, rows = report
    text = md.read_text(encoding="utf-8")
    book = [r for r in rows if r["category"] == "book"]
    ds = np.mean([r["ds"] for r in book])
    var = np.mean([r["var"] for r in book])
    tokens = sum(r["n_tokens"] for r in book if r["kept"])
    assert f"| book | 20 | 10 | {tokens} | {ds:.4g} | {var:.3e} | 0.9500 |" in text
    assert "| code | 4 | 0 | 0 | 0.5 | 2.000e-06 | 0.2500 |" in text
    assert "| solo | 1 | 1 | 7 | 0.1235 | 3.300e-07 | -1.5000 |" in text


def test_top_bottom_order(report: tuple[Path, Path, list[dict]]) -> None:
    _, md, _ = report
    book = md.read_text(encoding="utf-8").split("## book", 1)[1].split("## code", 1)[0]
    top = _table_rows(book, "### Top 3 by LDS")
    bottom = _table_rows(book, "### Bottom 3 by LDS")
    assert [r.split("|")[2].strip() for r in top] == ["book-19", "book-18", "book-17"]
    assert [r.split("|")[2].strip() for r in bottom] == ["book-0", "book-1", "book-2"]
    assert top[0].startswith("| 1 | book-19 | 1.9000 |")
    assert "| yes |" in top[0] and "| no |" in bottom[0]


def test_ties_keep_input_order(report: tuple[Path, Path, list[dict]]) -> None:
    _, md, _ = report
    code = md.read_text(encoding="utf-8").split("## code", 1)[1].split("## solo", 1)[0]
    assert [r.split("|")[2].strip() for r in _table_rows(code, "### Top 3 by LDS")] == [
        "code-0",
        "code-1",
        "code-2",
    ]


def test_escaping_keeps_tables_valid(report: tuple[Path, Path, list[dict]]) -> None:
    _, md, _ = report
    text = md.read_text(encoding="utf-8")
    table_lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    rank_lines = [ln for ln in table_lines if ln.count("|") >= 8]
    for ln in table_lines:
        assert _unescaped_pipes(ln) in (8, 9), ln  # summary: 7 columns -> 8 pipes; rank tables: 9
    assert len(rank_lines) > 0
    bad = next(ln for ln in table_lines if "code-0" in ln)
    cell = bad.rsplit(" |", 1)[0].split("| no | ", 1)[1]
    assert cell.startswith("a \\| b \\`c\\` \\\\x")
    assert len(cell.replace("\\\\", "\\").replace("\\|", "|").replace("\\`", "`")) == 80
    solo = next(ln for ln in table_lines if "solo-0" in ln)
    assert "first second \\| part" in solo
    assert "\n" not in solo


def test_empty_and_degenerate(tmp_path: Path) -> None:
    png, md = write_report([], tmp_path / "empty")
    assert png.read_bytes()[:8] == PNG_MAGIC and md.exists()
    one = [dict(data_id="x", category="c", ds=1.0, var=0.0, lds=0.0, kept=False, n_tokens=1, first_line="")]
    png, md = write_report(one, tmp_path / "one", top_k=0)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "### Top" not in md.read_text(encoding="utf-8")
