"""Selection at scale: pre-processing spread over ranks (world sizes 1, 2, 3, a killed rank, a CPU-only
``stage=preprocess`` pass), window offsets, ``select.overlap=drop``, progress lines without a terminal, the
cost dashboard. Ranks run as separate processes with explicit ``shard.rank`` / ``shard.world_size``; the
random scorer stands in where scores do not matter."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, sample_records

from longattn.selection.lds import duplicated_tokens, keep_mask, keep_mask_disjoint
from longattn.selection.numbering import combine_stats
from longattn.selection.pieces import assign_pieces, plan_pieces

W = 256
OUTS = ("windows.jsonl", "scores.jsonl", "selected.jsonl", "rejected.jsonl")


def select_cmd(out: Path, tokenizer_dir: Path, data: list[Path], *overrides: str) -> list[str]:
    return [sys.executable, "-m", "longattn.cli.select", f"out_dir={out}", f"window.length={W}", "window.workers=1",
            f"data.paths=[{','.join(map(str, data))}]", "model=tiny_llama", f"model.tokenizer={tokenizer_dir}",
            "scorer=random", "shard.windows=5", "shard.poll_seconds=0.1", "report.top_k=2", *overrides]


def run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def run_ranks(out: Path, world: int, tokenizer_dir: Path, data: list[Path], *overrides: str) -> list[str]:
    """Every rank of one world as its own process, all at once; their logs."""
    procs = [subprocess.Popen(select_cmd(out, tokenizer_dir, data, f"shard.world_size={world}", f"shard.rank={r}",
                                         *overrides), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(world)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs


def outputs(out: Path) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in OUTS}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """Real text in two files: a plain one that small pieces cut into byte ranges, and a gzip one (a whole
    piece however large); records without an id (their source is file:line) and a bad line."""
    d = tmp_path_factory.mktemp("scale_inputs")
    records = sample_records(2)
    plain, packed = d / "a.jsonl", d / "b.jsonl.gz"
    with open(plain, "w", encoding="utf-8") as f:
        for i, r in enumerate(records[:8]):
            f.write(json.dumps({"category": r["category"], "content": r["content"][:5000 + 700 * i]}) + "\n")
            if i == 3:
                f.write("{broken\n\n")
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        for r in records[8:]:
            f.write(json.dumps({"id": r["id"], "category": r["category"], "content": r["content"][:4000]}) + "\n")
    return [plain, packed]


REF_LOG = "reference.log"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir, inputs) -> Path:
    """One process, default pieces (one per file): what every world size must reproduce byte for byte. Its
    console output (a pipe, no terminal) is kept in ``reference.log`` beside the run, for the progress test."""
    out = tmp_path_factory.mktemp("ref") / "run"
    log = run(select_cmd(out, tokenizer_dir, inputs, "log_every=8", "scorer.batch_size=4"))
    (out.parent / REF_LOG).write_text(log)
    return out


# --- pre-processing by every rank ----------------------------------------------------------------
@pytest.mark.slow
def test_world_sizes_1_2_3_are_byte_identical(tmp_path, tokenizer_dir, inputs, reference):
    ref = outputs(reference)
    assert len(read(reference / "windows.jsonl")) > 40
    # world size 2 (the reference is world size 1): byte ranges of ~8 kB, every rank pre-processes its
    # pieces, then scores its shards
    out = tmp_path / "ws2"
    logs = run_ranks(out, 2, tokenizer_dir, inputs, "shard.piece_mb=0.008")
    assert outputs(out) == ref
    assert "pieces done; rank 0" in logs[0]  # rank 0's per-rank report before numbering
    pieces = json.loads((tmp_path / "ws2" / "preprocess" / "pieces.json").read_text())["pieces"]
    assert len(pieces) >= 5 and {p["path"] for p in pieces} == set(map(str, inputs))
    # world size 3: a CPU array pre-processes alone (stage=preprocess), then the scoring ranks start on it
    out = tmp_path / "ws3"
    run_ranks(out, 3, tokenizer_dir, inputs, "shard.piece_mb=0.008", "stage=preprocess")
    assert not (out / "shards" / "plan.json").exists() and not (out / "scores.jsonl").exists()
    n_pieces = len(json.loads((out / "preprocess" / "pieces.json").read_text())["pieces"])
    assert len(list((out / "preprocess").glob("piece-*[0-9].json"))) == n_pieces
    logs = run_ranks(out, 3, tokenizer_dir, inputs)
    assert not any(re.search(r"preprocess rank \d/3: .* tokens/s", log) for log in logs), "tokenised again"
    assert outputs(out) == ref
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["preprocess"]["ranks"]) == {"0", "1", "2"}
    assert metrics["counts"]["skipped_documents"] == {"malformed": 1}
    assert set(metrics["cost"]["scoring"]["per_rank"]) == {"0", "1", "2"}


@pytest.mark.slow
def test_seeded_sample_and_ids_do_not_depend_on_world_size(tmp_path, tokenizer_dir, inputs):
    one, two = tmp_path / "one", tmp_path / "two"
    run(select_cmd(one, tokenizer_dir, inputs, "window.sample_size=7"))
    run_ranks(two, 2, tokenizer_dir, inputs, "window.sample_size=7", "shard.piece_mb=0.008")
    assert outputs(one) == outputs(two)
    ids = [w["data_id"] for w in read(one / "windows.jsonl")]
    per_cat: dict[str, list[str]] = {}
    for i in ids:
        per_cat.setdefault(i.rsplit("_", 1)[0], []).append(i)
    assert all(v == [f"{c}_{k:07d}" for k in range(1, len(v) + 1)] and len(v) <= 7 for c, v in per_cat.items())


@pytest.mark.slow
def test_rank_killed_during_preprocessing_resumes(tmp_path, tokenizer_dir, reference, inputs):
    out = tmp_path / "killed"
    args = ("shard.world_size=2", "shard.piece_mb=0.004", "log_every=1")
    rank0 = subprocess.Popen(select_cmd(out, tokenizer_dir, inputs, *args, "shard.rank=0"), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(select_cmd(out, tokenizer_dir, inputs, *args, "shard.rank=1"), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pre = out / "preprocess"
    owner: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill rank 1 as soon as it has finished its first piece
        if not owner and (pre / "pieces.json").exists():
            pieces = json.loads((pre / "pieces.json").read_text())["pieces"]
            from longattn.selection.pieces import Piece

            owner = assign_pieces([Piece(**p) for p in pieces], 2)
        if owner and any((pre / f"piece-{i:05d}.json").exists() for i, r in enumerate(owner) if r == 1):
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    victim.wait()
    mine = [i for i, r in enumerate(owner) if r == 1]
    done = [i for i in mine if (pre / f"piece-{i:05d}.json").exists()]
    assert 0 < len(done) < len(mine), "rank 1 was not killed in the middle of its pieces"
    assert rank0.poll() is None  # rank 0 waits for rank 1's pieces
    log1 = run(select_cmd(out, tokenizer_dir, inputs, *args, "shard.rank=1"))  # the requeued rank
    # (rank 0 may have made some of rank 1's pieces meanwhile: it helps once its own are done)
    resumed = re.search(rf"resuming, (\d+) of my {len(mine)} pieces already done", log1)
    assert resumed and len(done) <= int(resumed.group(1)) < len(mine), log1[-3000:]
    assert "done before this run" in log1
    log0 = rank0.communicate(timeout=600)[0]
    assert rank0.returncode == 0, log0[-3000:]
    assert outputs(out) == outputs(reference)


def test_a_lone_rank_makes_the_pieces_of_ranks_not_started(tmp_path, tokenizer_dir, inputs):
    """A SLURM array that runs one element at a time: rank 0 of 3 helps with the others' pieces."""
    out = tmp_path / "lone"
    log = run(select_cmd(out, tokenizer_dir, inputs, "shard.world_size=3", "shard.rank=0", "shard.piece_mb=0.008",
                         "stage=preprocess"))
    n = len(json.loads((out / "preprocess" / "pieces.json").read_text())["pieces"])
    assert len(list((out / "preprocess").glob("piece-*[0-9].json"))) == n
    assert "helping with piece" in log and f"{n}/{n} pieces done" in log


# --- windows keep their place ----------------------------------------------------------------------
def test_offsets_reproduce_each_window_from_its_document(reference, inputs, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs: dict[str, str] = {}  # source_id -> text: the record's id, else file:line
    for path in inputs:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            for i, line in enumerate(f, start=1):
                if line.strip() and not line.startswith("{broken"):
                    r = json.loads(line)
                    docs[r.get("id", f"{path}:{i}")] = r["content"]
    windows = read(reference / "windows.jsonl")
    ids: dict[str, list[int]] = {}
    for w in windows:
        doc = ids.setdefault(w["source_id"], tok(docs[w["source_id"]], add_special_tokens=False)["input_ids"])
        assert w["doc_tokens"] == len(doc) and w["token_end"] - w["token_start"] == W
        assert tok.decode(doc[w["token_start"]:w["token_end"]]) == w["content"], w["data_id"]
    assert any(":" in w["source_id"] for w in windows) and any(":" not in w["source_id"] for w in windows)


# --- overlap policy --------------------------------------------------------------------------------
def test_disjoint_budget_skips_overlaps_and_refills():
    # one document, windows [0,4) [2,6) [4,8) [6,10) ranked 1 > 0 > 3 > 2; another document's window 4
    lds = np.array([0.9, 1.0, 0.5, 0.8, 0.1])
    n = np.full(5, 4)
    docs, starts, ends = ["d", "d", "d", "d", "e"], [0, 2, 4, 6, 0], [4, 6, 8, 10, 4]
    keep = keep_mask(lds, n, tokens=12)
    assert keep.tolist() == [True, True, False, True, False]
    assert duplicated_tokens(docs, starts, ends, keep) == 2
    drop, skipped = keep_mask_disjoint(lds, n, docs, starts, ends, tokens=12)
    assert drop.tolist() == [False, True, False, True, True] and skipped.tolist() == [True, False, True, False, False]
    assert duplicated_tokens(docs, starts, ends, drop) == 0 and n[drop].sum() == 12
    drop, _ = keep_mask_disjoint(lds, n, docs, starts, ends, fraction=0.4)  # floor(5 * 0.4) = 2 windows
    assert drop.tolist() == [False, True, False, True, False]
    unknown, _ = keep_mask_disjoint(lds, n, [None] * 5, starts, ends, tokens=12)  # no offsets: as allow
    assert unknown.tolist() == keep.tolist()


def _largest_fillable_budget(rows: list[dict]) -> int:
    """Windows per category that ``drop`` can fill in every category (its greedy pass takes windows in LDS
    order, so it fills m windows exactly when it accepts at least m in all): the budget of the test below."""
    cats: dict[str, list[dict]] = {}
    for r in rows:
        cats.setdefault(r["category"], []).append(r)
    accepted = []
    for rs in cats.values():
        cols = [[(r["source_id"], r["doc_tokens"]) for r in rs], [r["token_start"] for r in rs],
                [r["token_end"] for r in rs]]
        keep, _ = keep_mask_disjoint(np.array([r["lds"] for r in rs]), np.full(len(rs), W), *cols, fraction=1.0)
        accepted.append(int(keep.sum()))
    return min(accepted)


def test_overlap_drop_keeps_no_overlapping_pair_and_fills_the_budget(tmp_path, tokenizer_dir, inputs, reference):
    allowed = json.loads((reference / "metrics.json").read_text())["overlap"]
    assert allowed["policy"] == "allow" and allowed["duplicated_tokens"] > 0  # the reference's selection repeats text
    budget = _largest_fillable_budget(read(reference / "scores.jsonl")) * W
    drop = tmp_path / "drop"
    run(select_cmd(drop, tokenizer_dir, inputs, "select.overlap=drop", f"select.tokens={budget}"))
    metrics = json.loads((drop / "metrics.json").read_text())
    for cat, c in metrics["categories"].items():
        assert c["tokens_out"] == budget, cat  # the freed budget went to the next-best windows
    spans: dict[tuple, list[tuple[int, int]]] = {}
    for r in read(drop / "scores.jsonl"):
        if r["kept"]:
            spans.setdefault((r["source_id"], r["doc_tokens"]), []).append((r["token_start"], r["token_end"]))
    for s in spans.values():
        s.sort()
        assert all(a[1] <= b[0] for a, b in zip(s, s[1:], strict=False)), s
    assert metrics["overlap"]["policy"] == "drop" and metrics["overlap"]["duplicated_tokens"] == 0
    rejected = read(drop / "rejected.jsonl")
    assert metrics["counts"]["rejected"]["overlap"] == sum(r["reason"] == "overlap" for r in rejected) > 0


# --- progress without a terminal, cost dashboard ---------------------------------------------------
PROGRESS = re.compile(r"score rank 0/1: (\d+)/(\d+) windows \([\d.]+%\), [\d.]+ windows/s, [\d.]+k? tokens/s, ETA ")


def test_progress_lines_without_a_terminal_and_cost_dashboard(tmp_path, tokenizer_dir, inputs, reference):
    log = (reference.parent / REF_LOG).read_text()  # log_every=8, stdout a pipe
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    done = [int(m.group(1)) for m in PROGRESS.finditer(log)]
    total = int(PROGRESS.search(log).group(2))
    assert len(done) >= total // 10 and done == sorted(done) and done[-1] == total, log[-2000:]  # every <= 9
    assert re.search(r"preprocess rank 0/1: .* windows, .* tokens/s, ETA .*\(finished\)", log)
    rows = read(out / "metrics.jsonl")
    live = [r["select/progress/score/done"] for r in rows if "select/progress/score/done" in r]
    assert len(live) >= total // 10 and live[-1] == total  # logged as the run went, not only at the end
    metrics = json.loads((out / "metrics.json").read_text())
    cost = metrics["cost"]
    assert cost["scoring"]["per_rank"]["0"]["device"] == "cpu" and cost["scoring"]["windows_per_s"] > 0
    assert cost["scoring"]["device_hours_36B_tokens"] == pytest.approx(
        cost["scoring"]["device_hours_per_billion_tokens"] * 36)
    assert cost["preprocess"]["tokens_per_s_per_core"] > 0
    assert [r["device_hours_36B_tokens"] for r in cost["paper_table5"]] == [30.0, 600.0, 50.0, 100.0]
    report = (out / "report.md").read_text()
    assert "## Cost" in report and "longattn LLaMA-3.1-8B (paper Table 5)" in report and "tokens/s per core" in report
    # a resumed run says how much an earlier run had done
    last = sorted((out / "shards").glob("scores-*[0-9].jsonl"))[-1]
    redo = len(read(last))
    last.unlink()
    log = run(select_cmd(out, tokenizer_dir, inputs, "log_every=8"))
    assert re.search(rf"score rank 0/1: {total}/{total} windows .*; {total - redo} windows done before this run", log)


# --- pieces ---------------------------------------------------------------------------------------
def test_pieces_cut_at_line_starts_with_true_line_numbers(tmp_path):
    p = tmp_path / "x.jsonl"
    lines = [json.dumps({"content": "x" * (i * 37 % 300)}) + "\n" for i in range(200)]
    lines[50] = "\n"  # a blank line still counts as a line
    p.write_text("".join(lines))
    raw = p.read_bytes()
    pieces = plan_pieces([str(p)], 2000)
    assert len(pieces) > 5 and pieces[0].start == 0 and pieces[-1].end == -1
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert a.end == b.start and raw[b.start - 1:b.start] == b"\n" and a.size >= 2000
        assert b.line == raw[:b.start].count(b"\n") + 1
    assert sum(x.size for x in pieces) == len(raw)
    owner = assign_pieces(pieces, 3)
    loads = [sum(x.size for x, r in zip(pieces, owner, strict=True) if r == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(x.size for x in pieces)


def test_combined_counters_are_one_process_counters():
    a = {"documents": 3, "skipped": {"too_short": 1}, "windows": {"book": 2}, "errors": ["f:1: bad"] * 1,
         "category_map": {"'Book'": {"category": "book", "records": 1}}, "seconds": 1.0, "cpu_seconds": 2.0,
         "bytes": 10, "rank": 1, "piece": 0, "offsets": [0, 5], "categories": ["book", "book"]}
    b = {"documents": 2, "skipped": {"too_short": 2, "empty": 1}, "windows": {"book": 1, "code": 4},
         "errors": [f"g:{i}: bad" for i in range(25)], "category_map": {"'Book'": {"category": "book", "records": 2}},
         "seconds": 0.5, "cpu_seconds": 1.0, "bytes": 7, "rank": 0, "piece": 1, "offsets": [0], "categories": ["code"]}
    c = combine_stats([a, b])
    assert c["documents"] == 5 and c["skipped"] == {"too_short": 3, "empty": 1} and c["windows"] == {"book": 3, "code": 4}
    assert c["errors"] == ["f:1: bad"] + [f"g:{i}: bad" for i in range(19)]
    assert c["category_map"] == {"'Book'": {"category": "book", "records": 3}}
    assert c["pieces"] == 2 and c["ranks"]["1"]["cpu_seconds"] == 2.0 and "offsets" not in c


def test_rank0_totals_from_every_rank_snapshot(tmp_path):
    from longattn.selection.progress import Progress, TotalsLogger, per_rank_status

    logged: list[dict] = []

    class Sink:
        def log(self, m: dict) -> None:
            logged.append(m)

    ranks = [Progress("score", r, 2, total=10, done_before=2 * r, log_every=3, snapshot_dir=tmp_path) for r in (0, 1)]
    ranks[0].on_report = TotalsLogger(Sink(), tmp_path, "score", 2, grand_total=20)
    ranks[1].advance(4, 4, 400)  # rank 1 reports first (4 >= log_every)
    ranks[0].advance(3, 3, 300)
    last = logged[-1]
    assert last["select/progress/score/done"] == 3 + 2 + 4 and last["select/progress/score/total"] == 20
    assert last["select/progress/score/rank1/done"] == 6 and last["select/progress/score/windows"] == 7
    assert last["select/progress/score/eta_s"] > 0
    assert per_rank_status([True, False, True], [0, 1, 0], 2, "shards") == "2/3 shards done; rank 0 2/2, rank 1 0/1"


def test_a_line_at_least_every_interval_however_slow(monkeypatch, caplog):
    import longattn.selection.progress as progress

    monkeypatch.setattr(progress, "LOG_SECONDS", 0.05)
    p = progress.Progress("score", 2, 4, total=100, done_before=40, log_every=1000)
    with caplog.at_level("INFO", logger="longattn.selection.progress"):
        p.advance(1, 1, 256)
        assert not caplog.records  # 1 window < log_every, and too soon
        time.sleep(0.06)
        p.advance(1, 1, 256)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("score rank 2/4: 42/100 windows (42.0%), ") and "tokens/s, ETA " in line
    assert line.endswith("; 40 windows done before this run")
