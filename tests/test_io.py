"""Input readers on damaged and odd files: what is read, what is counted, what names the place to fix."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longattn.common.errors import ConfigError
from longattn.common.io import expand_inputs, file_digest, iter_file


def records(path) -> list:
    return [r for r, _ in iter_file(str(path))]


def jsonl(n: int, start: int = 0) -> bytes:
    return "".join(json.dumps({"id": i, "content": f"document {i} " * 40}) + "\n" for i in range(start, start + n)).encode()


def test_truncated_gzip_keeps_records_before_the_damage(tmp_path):
    raw = jsonl(3000)
    data = gzip.compress(raw)
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    recs = records(p)
    good, last = recs[:-1], recs[-1]
    assert last.unreadable and last.record is None and "EOFError" in last.error
    assert last.line == len(good) + 1 and last.where == f"{p}:{last.line}"
    assert [r.record["id"] for r in good] == list(range(len(good))) and len(good) > 100


def test_corrupt_gzip_data_is_unreadable_not_fatal(tmp_path):
    data = bytearray(gzip.compress(jsonl(3000)))
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    p = tmp_path / "bad.jsonl.gz"
    p.write_bytes(bytes(data))
    recs = records(p)
    assert recs[-1].unreadable and all(r.record is not None for r in recs[:-1])


def test_compression_is_recognised_by_content(tmp_path):
    plain_named_gz = tmp_path / "plain.jsonl.gz"
    plain_named_gz.write_bytes(jsonl(5))
    gz_named_plain = tmp_path / "packed.jsonl"
    gz_named_plain.write_bytes(gzip.compress(jsonl(5)))
    for p in (plain_named_gz, gz_named_plain):
        assert [r.record["id"] for r in records(p)] == [0, 1, 2, 3, 4]


def test_corrupt_parquet_is_unreadable_and_names_the_file(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    (rec,) = records(p)
    assert rec.unreadable and rec.path == str(p) and "Parquet" in rec.error


def test_parquet_damaged_in_a_later_row_group_keeps_the_first(tmp_path):
    p = tmp_path / "x.parquet"
    table = pa.table({"content": [f"text {i} " * 50 for i in range(600)], "id": list(range(600))})
    pq.write_table(table, p, row_group_size=256, compression="snappy")
    meta = pq.ParquetFile(p).metadata
    second = meta.row_group(1).column(0)
    data = bytearray(p.read_bytes())
    start = second.data_page_offset
    data[start: start + 200] = os.urandom(200)  # the second row group's first page
    p.write_bytes(bytes(data))
    recs = records(p)
    assert recs[-1].unreadable
    assert [r.record["id"] for r in recs[:-1]][:256] == list(range(256))


def test_invalid_utf8_is_read_replaced_and_flagged(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"content": "caf\xe9 ok"}\n{"content": "fine"}\n')
    a, b = records(p)
    assert a.decode_error and a.record["content"] == "caf\ufffd ok"
    assert not b.decode_error


@pytest.mark.parametrize("name,compress", [("bom.jsonl", False), ("bom.jsonl.gz", True)])
def test_utf8_bom_is_dropped_and_flagged(tmp_path, name, compress):
    p = tmp_path / name
    raw = b"\xef\xbb\xbf" + jsonl(2)
    p.write_bytes(gzip.compress(raw) if compress else raw)
    a, b = records(p)
    assert a.bom and a.record["id"] == 0 and not b.bom


def test_digest_comes_from_the_read_and_matches_sha256(tmp_path, monkeypatch):
    raw, packed = jsonl(50), gzip.compress(jsonl(50))
    for name, data in (("a.jsonl", raw), ("b.jsonl.gz", packed)):
        p = tmp_path / name
        p.write_bytes(data)
        records(p)
        # no second read: opening the file again would fail
        monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read twice")))
        assert file_digest(p) == hashlib.sha256(data).hexdigest()
        monkeypatch.undo()


def test_expand_inputs_directory_rule(tmp_path):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    (d / ".hidden").mkdir()
    for rel in ("b/2.jsonl.gz", "a.jsonl", "b/1.parquet", "README.md", "_SUCCESS", ".x.jsonl", ".hidden/z.jsonl"):
        (d / rel).write_text("")
    assert expand_inputs([str(d)]) == [str(d / "a.jsonl"), str(d / "b" / "1.parquet"), str(d / "b" / "2.jsonl.gz")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no input files"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="does not exist"):
        expand_inputs([str(tmp_path / "nope.jsonl")])


def test_expand_inputs_refuses_one_file_twice_however_spelled(tmp_path, monkeypatch):
    f = tmp_path / "c.jsonl"
    f.write_text("")
    (tmp_path / "link.jsonl").symlink_to(f)
    os.link(f, tmp_path / "hard.jsonl")
    monkeypatch.chdir(tmp_path)
    for twice in (["c.jsonl", str(f)], [str(f), "link.jsonl"], [str(f), "hard.jsonl"], [str(tmp_path), str(f)]):
        with pytest.raises(ConfigError, match="listed twice"):
            expand_inputs(twice)
    assert expand_inputs(["c.jsonl"]) == [str(f)]
