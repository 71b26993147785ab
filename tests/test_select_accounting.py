"""Property: whatever mix of good, bad and damaged records the inputs hold, every one is accounted for —
input = kept + rejected + skipped, per record (documents) and per window — and the counters say why."""

from __future__ import annotations

import gzip
import json
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
from conftest import sample_records
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longattn.cli.select import to_schema
from longattn.common.hydra_app import CONF_DIR
from longattn.selection.run import run_select
from longattn.selection.windows import slide_windows

W = 256
TEXTS = [r["content"] for r in sample_records(1)]
BOM = b"\xef\xbb\xbf"

DOC_KINDS = ["good", "good", "good", "short", "empty", "bad_json", "no_text", "text_not_str", "bad_category",
             "mapped_category", "bad_utf8"]
WINDOW_KINDS = ["good", "good", "good", "duplicate_id", "no_id", "empty", "bad_json"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _text(seed: int) -> str:
    return TEXTS[seed % len(TEXTS)][: 200 + seed % 2800]


def _doc_line(kind: str, seed: int) -> tuple[bytes, dict]:
    """A JSON Lines row of a document, and what the stage should make of it (category or skip reason)."""
    text = _text(seed)
    rows = {
        "good": ({"content": text, "id": f"d{seed}"}, {"category": "default"}),
        "short": ({"content": "too short"}, {"skip": "too_short"}),
        "empty": ({"content": "  \n "}, {"skip": "empty"}),
        "no_text": ({"other": 1}, {"skip": "malformed"}),
        "text_not_str": ({"content": 7}, {"skip": "malformed"}),
        "bad_category": ({"content": text, "category": [1, 2]}, {"skip": "malformed"}),
        "mapped_category": ({"content": text, "category": ["ARXIV", 0][seed % 2]},
                            {"category": ["arxiv", "0"][seed % 2], "mapped": 1}),
    }
    if kind == "bad_json":
        return b'{"content": "broken', {"skip": "malformed"}
    if kind == "bad_utf8":
        return (b'{"content": "' + json.dumps(text)[1:-1].encode() + b'\xff"}',
                {"category": "default", "text": text + "\ufffd", "decode_error": 1})
    rec, out = rows[kind]
    return json.dumps(rec).encode(), {"text": text, **out}


def _window_line(kind: str, seed: int, i: int) -> tuple[bytes, dict]:
    text = _text(seed)
    rows = {
        "good": ({"data_id": f"w{i}", "content": text}, {"window": f"w{i}"}),
        "duplicate_id": ({"data_id": "w0", "content": text}, {"window": "w0"}),  # a duplicate unless w0 is absent
        "no_id": ({"content": text}, {"skip": "malformed"}),
        "empty": ({"data_id": f"w{i}", "content": " "}, {"skip": "empty"}),
    }
    if kind == "bad_json":
        return b'{"data_id": ', {"skip": "malformed"}
    rec, out = rows[kind]
    return json.dumps(rec).encode(), out


files = st.lists(
    st.tuples(st.lists(st.tuples(st.integers(0, len(DOC_KINDS) - 1), st.integers(0, 10**6)), max_size=7),
              st.booleans(),  # gzip-compressed
              st.booleans(),  # starts with a UTF-8 BOM
              st.one_of(st.none(), st.floats(0.05, 0.95))),  # truncate the compressed file there
    min_size=1, max_size=3)


def _write(d: Path, j: int, lines: list[bytes], gz: bool, bom: bool, cut: float | None) -> tuple[Path, int, bool]:
    """Write one input; return it, how many of its lines a reader gets, and whether it is damaged."""
    data = (BOM if bom else b"") + b"".join(x + b"\n" for x in lines)
    p = d / f"in{j}.jsonl{'.gz' if gz else ''}"
    if not gz:
        p.write_bytes(data)
        return p, len(lines), False
    packed = gzip.compress(data)
    if cut is None:
        p.write_bytes(packed)
        return p, len(lines), False
    p.write_bytes(packed[: int(len(packed) * cut)])
    # Independent of the reader: complete lines in what zlib can decompress of the truncated stream.
    prefix = zlib.decompressobj(wbits=31).decompress(p.read_bytes())
    return p, len(prefix.split(b"\n")) - 1, True


def _select(out: Path, paths: list[Path], tokenizer_dir: Path, *extra: str) -> dict:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("select", overrides=[f"out_dir={out}", f"window.length={W}", "window.workers=1",
                                           "report.enabled=false", "model=tiny_llama", f"model.tokenizer={tokenizer_dir}",
                                           "scorer=random", f"data.paths=[{','.join(map(str, paths))}]", *extra])
    return run_select(to_schema(cfg)).metrics


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=files)
def test_every_document_and_window_is_accounted_for(spec, tokenizer, tokenizer_dir):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths, expect = [], []
        skips: Counter = Counter()
        repaired = Counter()
        for j, (rows, gz, bom, cut) in enumerate(spec):
            made = [_doc_line(DOC_KINDS[k], seed) for k, seed in rows]
            p, n_read, damaged = _write(d, j, [line for line, _ in made], gz, bom, cut)
            paths.append(p)
            expect += [e for _, e in made[:n_read]]
            skips["unreadable"] += damaged
            repaired["bom"] += bom and n_read > 0
        windows: Counter = Counter()
        for e in expect:
            repaired["decode_errors"] += e.get("decode_error", 0)
            repaired["category_normalised"] += e.get("mapped", 0)
            if "skip" in e:
                skips[e["skip"]] += 1
                continue
            n = len(tokenizer(e["text"], add_special_tokens=False)["input_ids"])
            if spans := slide_windows(n, W):
                windows[e["category"]] += len(spans)
            else:
                skips["exact_window" if n == W else "too_short"] += 1
        m = _select(d / "run", paths, tokenizer_dir)
        pre = m["preprocess"]
        # per record: read = skipped for a reason + documents that gave windows; damaged tails are one unit each
        assert pre["documents"] == len(expect) + skips["unreadable"]
        assert m["counts"]["skipped_documents"] == {k: v for k, v in skips.items() if v}
        assert m["counts"]["repaired"] == {"decode_errors": repaired["decode_errors"], "bom": repaired["bom"],
                                           "category_normalised": repaired["category_normalised"]}
        # per window: every window is scored once and kept or rejected
        assert {c: v["windows_in"] for c, v in m["categories"].items()} == {c: v for c, v in windows.items() if v}
        n_windows = sum(windows.values())
        assert len(_lines(d / "run" / "scores.jsonl")) == n_windows
        assert len(_lines(d / "run" / "selected.jsonl")) + len(_lines(d / "run" / "rejected.jsonl")) == n_windows
        assert m["counts"]["kept"] + m["counts"]["rejected"]["below_threshold"] == n_windows
        assert bool(m["warnings"]) >= bool(skips["unreadable"] or not n_windows or repaired["decode_errors"])


window_files = st.lists(
    st.tuples(st.lists(st.tuples(st.integers(0, len(WINDOW_KINDS) - 1), st.integers(0, 10**6)), max_size=6),
              st.booleans(), st.one_of(st.none(), st.floats(0.05, 0.95))),
    min_size=1, max_size=3)


@settings(max_examples=10, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=window_files)
def test_every_preprocessed_window_is_accounted_for(spec, tokenizer_dir):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths, expect, damaged, i = [], [], 0, 0
        for j, (rows, gz, cut) in enumerate(spec):
            made = []
            for k, seed in rows:
                made.append(_window_line(WINDOW_KINDS[k], seed, i))
                i += 1
            p, n_read, bad = _write(d, j, [line for line, _ in made], gz, False, cut)
            paths.append(p)
            expect += [e for _, e in made[:n_read]]
            damaged += bad
        seen, skips = set(), Counter({"unreadable": damaged})
        for e in expect:
            if "skip" in e:
                skips[e["skip"]] += 1
            elif e["window"] in seen:
                skips["duplicate_id"] += 1
            else:
                seen.add(e["window"])
        m = _select(d / "run", paths, tokenizer_dir, "data.preprocessed=true")
        assert m["counts"]["skipped_windows"] == {k: v for k, v in skips.items() if v}
        scored = {r["data_id"] for r in _lines(d / "run" / "scores.jsonl")}
        assert scored == seen
        kept = {r["data_id"] for r in _lines(d / "run" / "selected.jsonl")}
        rejected = {r["data_id"] for r in _lines(d / "run" / "rejected.jsonl")}
        assert kept | rejected == seen and not kept & rejected
        # input = kept + rejected + skipped, counting a damaged tail as one
        assert len(expect) + damaged == len(kept) + len(rejected) + sum(m["counts"]["skipped_windows"].values())
