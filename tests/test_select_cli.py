"""End to end: `python -m longattn.cli.select` on a tiny random LLaMA over real text, resume, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

W = 256


def run_select(out_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "longattn.cli.select", f"out_dir={out_dir}", f"window.length={W}",
           "window.workers=2", "report.top_k=3", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def tiny(tokenizer_dir) -> list[str]:
    return ["model=tiny_llama", f"model.tokenizer={tokenizer_dir}"]


@pytest.fixture()
def bad_corpus(corpus) -> Path:
    """The real corpus plus a bad JSON line, an empty document and a too-short one."""
    text = corpus.read_text()
    corpus.write_text(text + '{"content": "broken\n{"content": ""}\n{"content": "too short", "category": "book"}\n')
    return corpus


def test_end_to_end_outputs_and_accounting(tmp_path, tiny, bad_corpus):
    out = tmp_path / "run"
    proc = run_select(out, f"data.paths=[{bad_corpus}]", *tiny)
    for name in ("windows.jsonl", "scores.jsonl", "selected.jsonl", "rejected.jsonl", "metrics.json",
                 "report.png", "report.md", "config.yaml"):
        assert (out / name).exists(), name
    assert "category" in proc.stdout and "selected.jsonl" in proc.stdout
    windows, scores = read(out / "windows.jsonl"), read(out / "scores.jsonl")
    selected, rejected = read(out / "selected.jsonl"), read(out / "rejected.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    # Every window is kept or rejected with its reason; every bad document is counted.
    assert len(windows) == len(scores) == len(selected) + len(rejected)
    assert {r["reason"] for r in rejected} == {"below_threshold"}
    assert metrics["counts"]["skipped_documents"] == {"malformed": 1, "empty": 1, "too_short": 1}
    assert any(":7:" in e for e in metrics["preprocess"]["errors"])  # file and line of the bad JSON
    assert set(selected[0]) == {"content", "data_id", "category"}
    assert windows[0]["data_id"].startswith(windows[0]["category"] + "_") and windows[0]["n_tokens"] == W
    for r in scores:
        assert len(r["ds_heads"]) == 4 and len(r["var_heads"]) == 4 and "lds" in r
    for cat, c in metrics["categories"].items():
        n = sum(1 for w in windows if w["category"] == cat)
        assert c["windows_in"] == n and c["kept"] == n // 2  # select.fraction=0.5, as the reference
    for key in ("load_seconds", "score_seconds", "windows", "windows_per_second", "peak_rss_mb"):
        assert metrics[key] is not None, key


OUTS = ("scores.jsonl", "selected.jsonl", "rejected.jsonl")


def outputs(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in OUTS}


def test_resume_from_torn_journal_gives_identical_outputs(tmp_path, tiny, corpus):
    out = tmp_path / "run"
    run_select(out, f"data.paths=[{corpus}]", *tiny, "shard.windows=4")
    first = outputs(out)
    shards = sorted((out / "shards").glob("scores-*[0-9].jsonl"))
    assert len(shards) >= 3
    # A kill mid-shard: the last shard back to a journal with half its rows and a torn line.
    lines = shards[-1].read_text().splitlines(keepends=True)
    shards[-1].unlink()
    (out / "shards" / (shards[-1].stem + ".partial.jsonl")).write_text("".join(lines[:2]) + lines[2][:25])
    shards[0].unlink()  # and a shard never started
    for n in OUTS:
        (out / n).unlink()
    proc = run_select(out, f"data.paths=[{corpus}]", *tiny, "shard.windows=4")
    assert "resuming: 2 rows" in proc.stdout + proc.stderr
    assert outputs(out) == first


def _journal_rows(out: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in (out / "shards").glob("*.partial.jsonl"))


def _finished_shards(out: Path) -> int:
    return len(list((out / "shards").glob("scores-*[0-9].jsonl")))


@pytest.mark.parametrize("sig,landed", [
    (signal.SIGKILL, lambda out: _journal_rows(out) >= 1),  # mid-shard: a journal with rows
    (signal.SIGTERM, lambda out: _finished_shards(out) >= 2),  # between shards: some complete
])
def test_kill_mid_scoring_then_rerun_is_byte_identical(tmp_path, tiny, corpus, sig, landed):
    ref = tmp_path / "ref"
    run_select(ref, f"data.paths=[{corpus}]", *tiny, "shard.windows=3")
    n_shards = _finished_shards(ref)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "longattn.cli.select", f"out_dir={out}", f"window.length={W}", "window.workers=2",
           "report.top_k=3", f"data.paths=[{corpus}]", *tiny, "shard.windows=3", "scorer.batch_size=1"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ((out / "shards").is_dir() and landed(out)) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(sig)
    p.wait()
    # The kill landed while scoring: some but not all shards finished, nothing merged yet.
    assert landed(out) and _finished_shards(out) < n_shards and not (out / "metrics.json").exists()
    run_select(out, f"data.paths=[{corpus}]", *tiny, "shard.windows=3")
    assert outputs(out) == outputs(ref)


def test_two_ranks_equal_one(tmp_path, tiny, corpus):
    ref = tmp_path / "ref"
    run_select(ref, f"data.paths=[{corpus}]", *tiny, "shard.windows=2")
    out = tmp_path / "ws2"
    base = [sys.executable, "-m", "longattn.cli.select", f"out_dir={out}", f"window.length={W}", "window.workers=1",
            "report.top_k=3", f"data.paths=[{corpus}]", *tiny, "shard.windows=2", "shard.world_size=2",
            "shard.poll_seconds=0.2"]
    procs = [subprocess.Popen([*base, f"shard.rank={r}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in (1, 0)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert outputs(out) == outputs(ref)
    ranks = {json.loads(p.read_text())["device"] for p in (out / "shards").glob("rank-*.json")}
    assert ranks == {"cpu"} and len(list((out / "shards").glob("rank-*.json"))) == 2
    assert "rank 1/2: my shards are done" in logs[0]


def test_rerun_with_other_model_config_is_refused(tmp_path, tiny, corpus):
    out = tmp_path / "run"
    run_select(out, f"data.paths=[{corpus}]", *tiny)
    proc = run_select(out, f"data.paths=[{corpus}]", *tiny, "model.seed=1", check=False)
    assert proc.returncode != 0 and "model.seed" in proc.stdout + proc.stderr


def test_preprocessed_input_scores_the_same(tmp_path, tiny, corpus):
    first = tmp_path / "a"
    run_select(first, f"data.paths=[{corpus}]", *tiny)
    second = tmp_path / "b"
    run_select(second, f"data.paths=[{first / 'windows.jsonl'}]", "data.preprocessed=true", *tiny)
    a = {r["data_id"]: r for r in read(first / "scores.jsonl")}
    b = {r["data_id"]: r for r in read(second / "scores.jsonl")}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["ds_heads"] == b[k]["ds_heads"] and a[k]["var_heads"] == b[k]["var_heads"]


def test_token_budget_minmax_and_sampling(tmp_path, tiny, corpus):
    import random

    import numpy as np

    out, full = tmp_path / "run", tmp_path / "full"
    run_select(out, f"data.paths=[{corpus}]", *tiny, f"select.tokens={2 * W}", "select.normalize=minmax",
               "window.sample_size=3")
    run_select(full, f"data.paths=[{corpus}]", *tiny)
    metrics = json.loads((out / "metrics.json").read_text())
    scores, every = read(out / "scores.jsonl"), read(full / "windows.jsonl")
    sampled = {w["content"] for w in read(out / "windows.jsonl")}
    for cat, c in metrics["categories"].items():
        # the reference's random.Random(12).sample of the category's windows, in its order
        pool = [w for w in every if w["category"] == cat]
        picks = pool if len(pool) <= 3 else [pool[i] for i in random.Random(12).sample(range(len(pool)), 3)]
        assert [w["content"] for w in read(out / "windows.jsonl") if w["category"] == cat] == \
            [w["content"] for w in picks]
        rows = [r for r in scores if r["category"] == cat]
        ds, var = np.array([r["ds"] for r in rows]), np.array([r["var"] for r in rows])

        def mm(x):
            return np.full_like(x, 0.5) if x.max() == x.min() else (x - x.min()) / (x.max() - x.min())

        assert np.allclose([r["lds"] for r in rows], mm(ds) - 0.5 * mm(var), rtol=0, atol=1e-12)
        best = sorted(rows, key=lambda r: -r["lds"])[:2]  # 2 windows of W tokens fit the budget
        assert {r["data_id"] for r in rows if r["kept"]} == {r["data_id"] for r in best}
        assert c["kept"] == min(2, len(rows)) and c["tokens_out"] <= 2 * W
    assert sampled <= {w["content"] for w in every}


def test_parquet_input_gives_the_same_windows(tmp_path, tiny, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(read(corpus)), pq_path, row_group_size=2)
    a, b = tmp_path / "jsonl", tmp_path / "parquet"
    run_select(a, f"data.paths=[{corpus}]", *tiny, "scorer=random")
    run_select(b, f"data.paths=[{pq_path}]", *tiny, "scorer=random")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("source_id", "source_file")} for r in rows]  # noqa: E731
    assert strip(read(a / "windows.jsonl")) == strip(read(b / "windows.jsonl"))
    assert outputs(a) == outputs(b)


def test_shards_seek_into_gz_and_parquet_window_files(tmp_path, tiny, corpus):
    """Pre-processed windows in .jsonl.gz and .parquet: shards start mid-file (by line) and score the same."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    first = tmp_path / "a"
    run_select(first, f"data.paths=[{corpus}]", *tiny)
    wins = read(first / "windows.jsonl")
    half = len(wins) // 2
    gz, par = tmp_path / "w1.jsonl.gz", tmp_path / "w2.parquet"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(w, ensure_ascii=False) + "\n" for w in wins[:half])
    pq.write_table(pa.Table.from_pylist(wins[half:]), par, row_group_size=2)
    out = tmp_path / "b"
    run_select(out, f"data.paths=[{gz},{par}]", "data.preprocessed=true", *tiny, "shard.windows=3")
    plan = json.loads((out / "shards" / "plan.json").read_text())
    assert any(s["line"] > 1 for s in plan["starts"] if s["path"] == 0)  # a shard starts inside the gz file
    assert any(s["line"] > 1 for s in plan["starts"] if s["path"] == 1)  # and inside the parquet file
    assert outputs(out) == outputs(first)


def test_write_rejected_false_still_counts_them(tmp_path, tiny, corpus):
    out = tmp_path / "run"
    run_select(out, f"data.paths=[{corpus}]", *tiny, "scorer=random", "select.write_rejected=false")
    metrics = json.loads((out / "metrics.json").read_text())
    assert not (out / "rejected.jsonl").exists()
    n_windows = len(read(out / "windows.jsonl"))
    assert metrics["counts"]["rejected"]["below_threshold"] == n_windows - len(read(out / "selected.jsonl")) > 0


def test_merge_only_names_the_missing_shards(tmp_path, tiny, corpus):
    out = tmp_path / "run"
    common = [f"data.paths=[{corpus}]", *tiny, "scorer=random", "shard.windows=2", "shard.world_size=2"]
    run_select(out, *common, "shard.rank=0", "shard.merge=never")
    proc = run_select(out, *common, "shard.rank=0", "shard.merge=only", check=False)
    assert proc.returncode != 0 and "shard.merge=only but shards [1, 3" in proc.stdout + proc.stderr
    assert not (out / "metrics.json").exists()
    run_select(out, *common, "shard.rank=1", "shard.merge=never")
    run_select(out, *common, "shard.rank=0", "shard.merge=only")
    ref = tmp_path / "ref"
    run_select(ref, f"data.paths=[{corpus}]", *tiny, "scorer=random", "shard.windows=2")
    assert outputs(out) == outputs(ref)


@pytest.mark.parametrize("override,message", [
    ("window.length=130", "window.length=130 must be divisible by 4"),
    ("select.normalize=rank", "select.normalize"),
    ("data.paths=[]", "data.paths is empty"),
])
def test_bad_config_names_the_key(tmp_path, tiny, corpus, override, message):
    proc = run_select(tmp_path / "x", f"data.paths=[{corpus}]", *tiny, override, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
