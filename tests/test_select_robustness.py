"""Selection that loses nothing and mixes nothing: one test per fault of a user's rerun, damaged input or odd
record, each checking that every input ends up kept, rejected or counted."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, sample_records
from hydra import compose, initialize_config_dir

from longattn.cli.select import to_schema
from longattn.common.errors import ConfigError
from longattn.common.hydra_app import CONF_DIR
from longattn.common.io import InputError
from longattn.selection.fingerprints import ResumeRefused
from longattn.selection.run import run_select
from longattn.selection.summary import format_summary

W = 256
OUTS = ("scores.jsonl", "selected.jsonl", "rejected.jsonl")


def select(out: Path, *overrides: str, tokenizer: Path):
    """The stage in this process (random scorer: what is counted does not depend on the scores)."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("select", overrides=[f"out_dir={out}", f"window.length={W}", "window.workers=1",
                                           "report.enabled=false", "model=tiny_llama", f"model.tokenizer={tokenizer}",
                                           "scorer=random", *overrides])
    return run_select(to_schema(cfg))


def cli(out: Path, *overrides: str, tokenizer: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "longattn.cli.select", f"out_dir={out}", f"window.length={W}", "window.workers=1",
           "report.enabled=false", "model=tiny_llama", f"model.tokenizer={tokenizer}", "scorer=random", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def outputs(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in OUTS}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def docs(n: int, chars: int = 2500, skip: int = 0) -> list[dict]:
    return [{"id": r["id"], "category": r["category"], "content": r["content"][:chars]}
            for r in sample_records(2)[skip: skip + n]]


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def accounted(m: dict) -> None:
    """Every window scored is kept or rejected (the per-document side is checked by each test)."""
    kept, rejected = m["counts"]["kept"], sum(m["counts"]["rejected"].values())
    assert kept + rejected == sum(c["windows_in"] for c in m["categories"].values())


# --- two jobs, one out_dir -----------------------------------------------------------------------
def test_a_second_job_is_refused_naming_the_holder_and_a_dead_one_is_replaced(tmp_path, tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs(3))
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from longattn.common.lock import OutDirLock\n"
         "l = OutDirLock(sys.argv[1]); l.acquire(); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = cli(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)
        err = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "is in use by another job" in err
        assert f"pid {holder.pid} on host " in err and "started 20" in err  # host, pid and start time
        assert not (out / "config.yaml").exists() and not (out / "shards").exists()  # nothing written
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, its process gone
        holder.wait()
    proc = cli(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)
    assert proc.returncode == 0, proc.stderr
    assert "taking over the lock of a process that is gone" in proc.stdout + proc.stderr
    assert not list((out / ".lock").glob("rank-*.json"))  # released at the end


# --- inputs that change between runs -------------------------------------------------------------
def test_changed_input_is_refused_then_redone_from_scratch(tmp_path, tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs(4))
    out = tmp_path / "run"
    select(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)
    first = outputs(out)
    write_jsonl(corpus, docs(4, skip=1))  # one document deleted at the top, one added at the end
    with pytest.raises(ResumeRefused, match=f"{corpus}: .* bytes") as e:
        select(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)
    assert "data.on_change=redo" in str(e.value)
    assert outputs(out) == first  # the refused rerun touched nothing
    select(out, f"data.paths=[{corpus}]", "data.on_change=redo", tokenizer=tokenizer_dir)
    fresh = tmp_path / "fresh"
    select(fresh, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)
    assert outputs(out) == outputs(fresh)
    gone = {d["id"] for d in docs(1)}
    assert not {w["source_id"] for w in lines(out / "windows.jsonl")} & gone


def test_same_size_edit_is_found_by_its_hash_and_a_touch_is_not_a_change(tmp_path, tokenizer_dir):
    recs = docs(3)
    corpus = write_jsonl(tmp_path / "c.jsonl", recs)
    out = tmp_path / "run"
    select(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)
    first = outputs(out)
    os.utime(corpus, (time.time() + 5, time.time() + 5))  # touched: same content, new mtime
    select(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)
    assert outputs(out) == first
    text = corpus.read_text()
    corpus.write_text(text.replace("e", "a", 1))  # same size, other content
    os.utime(corpus, (time.time() + 10, time.time() + 10))
    with pytest.raises(ResumeRefused, match="content changed"):
        select(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)


def test_changed_preprocessed_windows_are_refused_not_paired_with_old_scores(tmp_path, tokenizer_dir):
    windows = [{"data_id": f"w{i}", "content": d["content"], "category": d["category"]} for i, d in enumerate(docs(4))]
    src = write_jsonl(tmp_path / "w.jsonl", windows)
    out = tmp_path / "run"
    select(out, f"data.paths=[{src}]", "data.preprocessed=true", tokenizer=tokenizer_dir)
    write_jsonl(src, [{"data_id": "new", "content": "inserted at the top", "category": "book"}, *windows])
    with pytest.raises(ResumeRefused, match="w.jsonl"):  # used to be a KeyError in the merge
        select(out, f"data.paths=[{src}]", "data.preprocessed=true", tokenizer=tokenizer_dir)
    res = select(out, f"data.paths=[{src}]", "data.preprocessed=true", "data.on_change=redo", tokenizer=tokenizer_dir)
    scored = {r["data_id"] for r in lines(out / "scores.jsonl")}
    assert scored == {"new", "w0", "w1", "w2", "w3"}
    accounted(res.metrics)


def test_one_file_however_spelled_is_one_input(tmp_path, tokenizer_dir, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs(3))
    (tmp_path / "link.jsonl").symlink_to(corpus)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    select(out, "data.paths=[c.jsonl]", tokenizer=tokenizer_dir)
    first = outputs(out)
    for spelling in (str(corpus), "link.jsonl", "./c.jsonl"):
        select(out, f"data.paths=[{spelling}]", tokenizer=tokenizer_dir)  # resumes: no refusal
        assert outputs(out) == first
    with pytest.raises(ConfigError, match="listed twice"):
        select(tmp_path / "twice", f"data.paths=[c.jsonl,{corpus}]", tokenizer=tokenizer_dir)
    assert not (tmp_path / "twice").exists()


# --- damaged inputs ------------------------------------------------------------------------------
def damaged_corpus(tmp_path: Path) -> tuple[list[str], dict]:
    """Good files around a truncated .gz, a plain file named .gz and a corrupt Parquet file."""
    good = write_jsonl(tmp_path / "good.jsonl", docs(2))
    packed = gzip.compress("".join(json.dumps(d) + "\n" for d in docs(8, skip=2)).encode())
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(packed[: int(len(packed) * 0.6)])
    plain = write_jsonl(tmp_path / "plain.jsonl.gz", docs(1, skip=10))
    parquet = tmp_path / "bad.parquet"
    parquet.write_bytes(b"PAR1" + os.urandom(100))
    (tmp_path / "more").mkdir()
    write_jsonl(tmp_path / "more" / "b.jsonl", docs(1, skip=11))
    read_before = sum(1 for _ in _complete_lines(truncated))
    return [str(good), str(truncated), str(plain), str(parquet), str(tmp_path / "more")], {"read_before": read_before}


def _complete_lines(path: Path):
    """Independent of the reader: the complete lines of a truncated gzip stream's decodable prefix."""
    import zlib

    prefix = zlib.decompressobj(wbits=31).decompress(path.read_bytes())
    yield from prefix.split(b"\n")[:-1]


def test_damaged_files_are_named_counted_and_the_rest_is_selected(tmp_path, tokenizer_dir):
    paths, info = damaged_corpus(tmp_path)
    res = select(tmp_path / "run", f"data.paths=[{','.join(paths)}]", tokenizer=tokenizer_dir)
    m = res.metrics
    assert m["counts"]["skipped_documents"].get("unreadable") == 2
    assert [u.split(":")[0] for u in m["unreadable"]] == [paths[1], paths[3]]
    assert any("damaged input" in w for w in m["warnings"])
    pre = m["preprocess"]
    # documents: 2 good + what the truncated gzip held before the damage + 1 + 1, and one unit per damaged file
    assert pre["documents"] == 2 + info["read_before"] + 1 + 1 + 2
    assert sum(pre["skipped"].values()) + len({w["source_id"] for w in lines(tmp_path / "run" / "windows.jsonl")}) \
        == pre["documents"]
    sources = {w["source_id"] for w in lines(tmp_path / "run" / "windows.jsonl")}
    wanted = {str(d["id"]) for d in docs(2) + docs(8, skip=2)[: info["read_before"]] + docs(2, skip=10)}
    assert sources <= wanted  # every good file's documents, and the damaged one's up to the damage
    assert len(wanted - sources) == pre["skipped"].get("too_short", 0) + pre["skipped"].get("exact_window", 0)
    accounted(m)


def test_on_error_fail_stops_at_the_damaged_file(tmp_path, tokenizer_dir):
    paths, _ = damaged_corpus(tmp_path)
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz:\d+: unreadable"):
        select(tmp_path / "run", f"data.paths=[{','.join(paths)}]", "data.on_error=fail", tokenizer=tokenizer_dir)
    with pytest.raises(Exception, match="data.on_error=ignore"):  # a Choice: Hydra names the key
        select(tmp_path / "run2", f"data.paths=[{paths[0]}]", "data.on_error=ignore", tokenizer=tokenizer_dir)


def test_a_directory_without_inputs_is_refused_before_any_side_effect(tmp_path, tokenizer_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no input files"):
        select(tmp_path / "run", f"data.paths=[{tmp_path / 'empty'}]", tokenizer=tokenizer_dir)
    assert not (tmp_path / "run").exists()


# --- config checks before any write --------------------------------------------------------------
def test_refused_rerun_leaves_config_yaml_and_unknown_keys_are_refused(tmp_path, tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs(2))
    out = tmp_path / "run"
    assert cli(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir).returncode == 0
    saved = (out / "config.yaml").read_bytes()
    hydra_records = {p: p.read_bytes() for p in (out / ".hydra_run").rglob("config.yaml")}
    proc = cli(out, f"data.paths=[{corpus}]", "model.seed=1", tokenizer=tokenizer_dir)
    assert proc.returncode != 0 and "model.seed" in proc.stdout + proc.stderr
    write_jsonl(corpus, docs(3))
    proc = cli(out, f"data.paths=[{corpus}]", tokenizer=tokenizer_dir)
    assert proc.returncode != 0 and str(corpus) in proc.stdout + proc.stderr
    assert (out / "config.yaml").read_bytes() == saved
    # Hydra's record of each attempt is its own folder: the refused ones overwrote nothing
    assert len(hydra_records) == 1 and all(p.read_bytes() == b for p, b in hydra_records.items())
    assert len(list((out / ".hydra_run").iterdir())) == 3
    proc = cli(tmp_path / "typo", f"data.paths=[{corpus}]", "+select.fracton=0.3", tokenizer=tokenizer_dir)
    assert proc.returncode != 0 and "select.fracton (did you mean select.fraction?)" in proc.stdout + proc.stderr
    assert not (tmp_path / "typo" / "config.yaml").exists()  # (Hydra's own .hydra_run log of the attempt aside)


# --- odd records, and runs that end with nothing -------------------------------------------------
def test_decode_errors_bom_and_categories_are_counted_and_mapped(tmp_path, tokenizer_dir):
    text = docs(1)[0]["content"]
    rows = [json.dumps({"content": text, "category": "ARXIV"}).encode(),
            json.dumps({"content": text, "category": " arxiv "}).encode(),
            json.dumps({"content": text, "category": "arxiv"}).encode(),
            json.dumps({"content": text, "category": 0}).encode(),
            json.dumps({"content": text, "category": ["a", "b"]}).encode(),
            json.dumps({"content": text + " caf\udce9"}, ensure_ascii=False).encode("utf-8", "surrogateescape")]
    p = tmp_path / "odd.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n")
    res = select(tmp_path / "run", f"data.paths=[{p}]", tokenizer=tokenizer_dir)
    m = res.metrics
    assert m["counts"]["repaired"] == {"decode_errors": 1, "bom": 1, "category_normalised": 3}
    assert m["category_map"] == {"'ARXIV'": {"category": "arxiv", "records": 1},
                                 "' arxiv '": {"category": "arxiv", "records": 1},
                                 "0": {"category": "0", "records": 1}}
    assert m["counts"]["skipped_documents"] == {"malformed": 1}  # the list category; the BOM line is read
    assert set(m["categories"]) == {"arxiv", "0", "default"}
    assert any("'ARXIV' -> 'arxiv'" in w for w in m["warnings"])
    assert any("invalid UTF-8" in w for w in m["warnings"])
    assert "categories normalised" in format_summary(m, {})


def test_empty_input_and_a_budget_that_keeps_nothing_warn(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    m = select(tmp_path / "a", f"data.paths=[{empty}]", tokenizer=tokenizer_dir).metrics
    assert m["warnings"] == [f"the inputs hold no records: nothing to select (data.paths=['{os.path.realpath(empty)}'])"]
    assert "warnings:" in format_summary(m, {})
    short = write_jsonl(tmp_path / "short.jsonl", [{"content": "too short for a window"}])
    m = select(tmp_path / "b", f"data.paths=[{short}]", tokenizer=tokenizer_dir).metrics
    assert m["warnings"] and m["warnings"][0].startswith("no windows to score: all 1 input records were skipped")
    corpus = write_jsonl(tmp_path / "c.jsonl", docs(2))
    m = select(tmp_path / "c", f"data.paths=[{corpus}]", "select.tokens=100", tokenizer=tokenizer_dir).metrics
    assert m["counts"]["kept"] == 0
    assert any("nothing kept" in w and "select.tokens=100 is less than one window of 256 tokens" in w
               for w in m["warnings"])
    accounted(m)


def test_peak_memory_counts_child_processes():
    """Two children of 400 MB side by side: the sampled tree peak is their sum, which getrusage(CHILDREN) (the
    largest single child) does not show. getrusage(SELF) is no reference here: Linux carries ru_maxrss over
    fork and exec, so a child of a big pytest process starts with pytest's peak."""
    code = ("import resource, subprocess, sys\n"
            "import importlib.util\n"  # the module alone: importing the package would load torch
            "spec = importlib.util.spec_from_file_location('memory', 'longattn/common/memory.py')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "child = 'import time; b = bytearray(400 * 2**20); b[::4096] = bytes(len(b[::4096])); time.sleep(2)'\n"
            "with m.track_peak_memory(interval=0.2):\n"
            "    kids = [subprocess.Popen([sys.executable, '-c', child]) for _ in range(2)]\n"
            "    [k.wait() for k in kids]\n"
            "largest_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "print(largest_child, m.sampled_peak_mb(), m.peak_rss_mb())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    largest_child, sampled, peak = map(float, out.split())
    assert 400 <= largest_child < 600  # one child, as getrusage sees it
    assert sampled >= 780 and sampled > largest_child + 200  # both children at once
    assert peak >= sampled
