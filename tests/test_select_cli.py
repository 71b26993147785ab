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


def test_sigkill_at_any_point_then_rerun_is_byte_identical(tmp_path, tiny, corpus):
    ref = tmp_path / "ref"
    run_select(ref, f"data.paths=[{corpus}]", *tiny, "shard.windows=3")
    for delay in (1.0, 4.0, 7.0):
        out = tmp_path / f"killed_{delay}"
        cmd = [sys.executable, "-m", "longattn.cli.select", f"out_dir={out}", f"window.length={W}", "window.workers=2",
               "report.top_k=3", f"data.paths=[{corpus}]", *tiny, "shard.windows=3"]
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL if delay != 4.0 else signal.SIGTERM)
        p.wait()
        run_select(out, f"data.paths=[{corpus}]", *tiny, "shard.windows=3")
        assert outputs(out) == outputs(ref), f"killed after {delay} s"


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
    out = tmp_path / "run"
    run_select(out, f"data.paths=[{corpus}]", *tiny, f"select.tokens={2 * W}", "select.normalize=minmax",
               "window.sample_size=3")
    metrics = json.loads((out / "metrics.json").read_text())
    for c in metrics["categories"].values():
        assert c["windows_in"] <= 3 and c["kept"] == min(2, c["windows_in"]) and c["tokens_out"] <= 2 * W
    scores = read(out / "scores.jsonl")
    for cat in metrics["categories"]:
        lds = [r["lds"] for r in scores if r["category"] == cat]
        assert min(lds) == 0.0 or max(lds) <= 1.0  # min-max normalised terms


@pytest.mark.parametrize("override,message", [
    ("window.length=130", "window.length=130 must be divisible by 4"),
    ("select.normalize=rank", "select.normalize"),
    ("data.paths=[]", "data.paths is empty"),
])
def test_bad_config_names_the_key(tmp_path, tiny, corpus, override, message):
    proc = run_select(tmp_path / "x", f"data.paths=[{corpus}]", *tiny, override, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
