"""Training samples from a selection: each selected window is exactly one sample; short documents are packed
with their boundaries kept; preparation is its own step, shardable, resumable, and reads short sources only
as far as the mix needs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import sample_records

pytest.importorskip("megatron.core")

W = 64  # window length = train.seq_length


def make_selection(out: Path, tok, length: int, per_category: int) -> dict[str, list[int]]:
    """A longattn-select out_dir whose windows re-tokenise to exactly ``length`` tokens (as they were cut):
    ``selected.jsonl`` in the selection's format and ``config.yaml`` with its window.length. Returns the
    token ids of every window by data id."""
    out.mkdir(parents=True, exist_ok=True)
    windows: dict[str, list[int]] = {}
    lines = []
    records = sample_records(2)
    for cat in ("arxiv", "book", "code"):
        n = 0
        for rec in (r for r in records if r["category"] == cat):
            ids = tok(rec["content"][: 40 * length * per_category], add_special_tokens=False)["input_ids"]
            for a in range(0, len(ids) - length, length):
                piece = ids[a : a + length]
                text = tok.decode(piece)
                if n < per_category and tok(text, add_special_tokens=False)["input_ids"] == piece:
                    n += 1
                    data_id = f"{cat}_{n:07d}"
                    windows[data_id] = piece
                    lines.append(json.dumps({"content": text, "data_id": data_id, "category": cat}) + "\n")
    (out / "selected.jsonl").write_text("".join(lines), encoding="utf-8")
    (out / "config.yaml").write_text(f"window:\n  length: {length}\n")
    return windows


def short_documents(path: Path, n: int) -> list[str]:
    """``n`` short documents (a few hundred characters each) with ids, as a short source's JSON Lines."""
    texts = [t for r in sample_records(1) for t in r["content"].split("\n\n") if 200 < len(t) < 800]
    rows = [{"id": f"wiki-{i:04d}", "content": texts[i % len(texts)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["id"] for r in rows]


def _cfg(tiny_hf_dir, selection: Path, short: Path, out: Path, *overrides: str):
    from test_train_units import _compose

    return _compose("model=llama3_8b", f"model.path={tiny_hf_dir}", f"data.selected={selection}",
                    f"data.short.wiki={short}", "data.weights.wiki=30", f"train.seq_length={W}", "train.steps=6",
                    "train.micro_batch_size=2", "train.grad_accum=2", "data.workers=0",
                    "data.prepare.unit_records=8", "data.preview=24", f"out_dir={out}", *overrides)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_hf_dir):
    """A selection of 8 windows per category and a short source of 400 documents (read-only)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("inputs")
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    windows = make_selection(root / "sel", tok, W, per_category=8)
    ids = short_documents(root / "wiki.jsonl", 400)
    return SimpleNamespace(tok=tok, windows=windows, short_ids=ids, sel=root / "sel", wiki=root / "wiki.jsonl")


def test_each_window_is_one_sample_and_short_samples_keep_documents_apart(inputs, tiny_hf_dir, tmp_path):
    from train.config import validate_inputs, validate_static
    from train.prepare import run_prepare
    from train.samples import build_mix, samples_per_source

    cfg = _cfg(tiny_hf_dir, inputs.sel, inputs.wiki, tmp_path / "run")
    validate_static(cfg)
    validate_inputs(cfg)
    manifest = run_prepare(cfg, world_size=1)
    data = tmp_path / "run" / "data"
    preview = [json.loads(x) for x in (data / "samples_preview.jsonl").read_text().splitlines()]
    mix = build_mix(manifest, data / "index_cache")
    assert len(preview) == len(mix) == 24
    bos, eos = inputs.tok.bos_token_id, inputs.tok.eos_token_id
    names = list(manifest["datasets"])
    assert names == ["wiki", "arxiv", "book", "code"]
    want = dict(zip(names, samples_per_source([manifest["datasets"][n]["weight"] for n in names], 24), strict=True))
    assert {n: sum(r["source"] == n for r in preview) for n in names} == want  # the mix is a mix of samples
    seen = []
    for row in preview:
        s = mix[row["sample"]]
        if row["source"] != "wiki":  # a selected window: the whole sample, nothing else
            (data_id,) = row["data_ids"]
            window = inputs.windows[data_id]
            assert data_id.startswith(row["source"]) and row["n_tokens"] == W and row["n_documents"] == 1
            assert s["labels"].tolist() == window and s["tokens"].tolist() == [bos, *window[:-1]]
            assert s["loss_mask"].sum() == W and s["position_ids"].tolist() == list(range(W))
            seen.append(data_id)
            continue
        tokens, pos = s["tokens"].tolist(), s["position_ids"].tolist()
        ends = [j for j, t in enumerate(tokens) if t == eos]
        assert all(pos[j + 1] == 0 for j in ends if j + 1 < W)  # positions restart after every document
        assert all(s["loss_mask"][j] == 0 for j in ends)  # no target across a document boundary
        assert row["n_documents"] == pos.count(0) == len([j for j in ends if j + 1 < W]) + 1
        # the ids of the documents the sample holds (and the next one's when its first token is the last target)
        assert len(row["data_ids"]) in (row["n_documents"], row["n_documents"] + 1)
        assert set(row["data_ids"]) <= set(inputs.short_ids)
    assert len(seen) == len(set(seen))  # no window twice while the selection has enough of them
    assert max(r["n_documents"] for r in preview if r["source"] == "wiki") >= 2
    # The short source is read only as far as the mix needs (with the margin), not in full.
    units = list((data / "units").glob("wiki-*/u*.done.json"))
    assert 1 <= len(units) < 400 // 8 / 4
    assert manifest["datasets"]["wiki"]["tokens"] >= want["wiki"] * W


def test_preparation_shards_over_processes_and_resumes(inputs, tiny_hf_dir, tmp_path, caplog):
    from train.prepare import run_prepare

    def prepared(out: Path, world: int, rank: int) -> dict | None:
        cfg = _cfg(tiny_hf_dir, inputs.sel, inputs.wiki, out, f"data.prepare.world_size={world}",
                   f"data.prepare.rank={rank}")
        return run_prepare(cfg, world_size=1)

    def tokens(manifest: dict) -> dict[str, bytes]:
        return {n: Path(d["prefix"] + ".bin").read_bytes() for n, d in manifest["datasets"].items()}

    one = prepared(tmp_path / "one", 1, 0)
    assert prepared(tmp_path / "two", 2, 1) is None  # rank 1 first: rank 0 has not finished, nobody merges
    two = prepared(tmp_path / "two", 2, 0)  # the last rank to finish merges
    assert tokens(two) == tokens(one)
    preview = (tmp_path / "one" / "data" / "samples_preview.jsonl").read_text()
    assert (tmp_path / "two" / "data" / "samples_preview.jsonl").read_text() == preview
    units = sorted((tmp_path / "two" / "data" / "units").glob("selected-*/u*.done.json"))
    assert len(units) == 3  # 24 windows in units of 8

    # A killed run: one unit and the merge are gone; the rerun tokenises that unit only.
    (tmp_path / "one" / "data" / "prepared.json").unlink()
    next((tmp_path / "one" / "data" / "units").glob("selected-*/u000001.done.json")).unlink()
    with caplog.at_level(logging.INFO, logger="train"):
        again = prepared(tmp_path / "one", 1, 0)
    assert "tokenised 1 units" in caplog.text
    assert tokens(again) == tokens(one)
    assert (tmp_path / "one" / "data" / "samples_preview.jsonl").read_text() == preview


def test_a_run_without_prepared_data_on_a_gpu_node_stops_before_tokenising(inputs, tiny_hf_dir, tmp_path):
    from train.config import derive
    from train.prepare import NotPrepared, ensure_prepared, run_prepare

    cfg = _cfg(tiny_hf_dir, inputs.sel, inputs.wiki, tmp_path / "run", "data.prepare.in_run=false")
    derive(cfg, 1)
    with pytest.raises(NotPrepared, match="train.prepare_only=true"):
        ensure_prepared(cfg, rank=0)
    assert not list((tmp_path / "run" / "data").glob("units/*/*.bin"))
    manifest = run_prepare(_cfg(tiny_hf_dir, inputs.sel, inputs.wiki, tmp_path / "run"), world_size=1)
    assert ensure_prepared(cfg, rank=0) == manifest  # prepared on CPU: the GPU run only reads the manifest


def test_bos_prepend_needs_a_bos_token():
    from test_train_units import _compose

    from longattn.common.errors import ConfigError
    from train.prepare import token_spec

    cfg = _compose("model=tiny_llama", "data.selected=/s", "train.steps=1", "out_dir=/x")
    with pytest.raises(ConfigError, match="data.bos=none"):
        token_spec(cfg, SimpleNamespace(bos_token_id=None, eos_token_id=2, __len__=lambda: 10))
    cfg.data.bos = "none"
    assert token_spec(cfg, type("T", (), {"bos_token_id": None, "eos_token_id": 2, "__len__": lambda s: 10})()).bos_id is None
