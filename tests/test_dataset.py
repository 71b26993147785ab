"""Every selection run leaves ``dataset/``: Parquet shards of the kept windows that ``datasets`` loads, and a
Hugging Face dataset card whose YAML header parses and whose body names the method and the counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, sample_records

from longattn.common.io import read_jsonl
from longattn.selection.dataset import hub_license, size_category

datasets = pytest.importorskip("datasets")

W = 256


def test_size_category_and_licence_fields():
    assert [size_category(n) for n in (0, 999, 1000, 54_000, 2_000_000)] == \
        ["n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]
    assert hub_license([]) == {}
    assert hub_license(["Apache-2.0"]) == {"license": "apache-2.0"}
    assert hub_license(["PSF-2.0"]) == {"license": "other", "license_name": "psf-2.0"}
    assert hub_license(["MIT", "PSF-2.0"]) == {"license": "other", "license_name": "mixed"}


def _card(path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture()
def licensed_corpus(tmp_path):
    """Real documents of three categories; the book ones carry no licence (the card must say what it knows)."""
    p = tmp_path / "corpus.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for r in sample_records(1):
            rec = {"id": r["id"], "category": r["category"], "content": r["content"][:5000]}
            if r["category"] != "book":
                rec["license"] = r["license"]
            f.write(json.dumps(rec) + "\n")
    return p


def test_selection_run_writes_a_loadable_dataset_with_a_card(tmp_path, tokenizer_dir, licensed_corpus):
    out = tmp_path / "sel"
    cmd = [sys.executable, "-m", "longattn.cli.select", f"data.paths=[{licensed_corpus}]", f"window.length={W}",
           "window.workers=1", "model=tiny_llama", f"model.tokenizer={tokenizer_dir}", "scorer=longattn",
           "dataset.shard_rows=3", f"out_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    selected = list(read_jsonl(out / "selected.jsonl"))
    kept = {r["data_id"]: r for r in read_jsonl(out / "scores.jsonl") if r["kept"]}
    per_cat = {c: sum(r["category"] == c for r in selected) for c in ("arxiv", "book", "code")}
    assert all(per_cat.values()) and len(kept) == len(selected)

    ds_dir = out / "dataset"
    train = datasets.load_dataset("parquet", data_dir=str(ds_dir), cache_dir=str(tmp_path / "hf"))["train"]
    assert train.num_rows == len(selected)
    offsets = "token_start" in next(iter(kept.values()))  # token offsets are written when the windows carry them
    assert {"content", "data_id", "category", "source_id", "n_tokens", "ds", "var", "lds", "license",
            *(["token_start", "token_end"] if offsets else [])} == set(train.column_names)
    by_id = {r["data_id"]: r for r in selected}
    for row in train:
        assert row["content"] == by_id[row["data_id"]]["content"]
        assert row["lds"] == pytest.approx(kept[row["data_id"]]["lds"])
        assert row["n_tokens"] == W and (not offsets or row["token_end"] - row["token_start"] == W)
        assert (row["license"] is None) == (row["category"] == "book")  # carried from the input records
    # shard_rows=3: more than one shard where a category keeps more than 3 windows
    arxiv_files = sorted((ds_dir / "data" / "arxiv").glob("*.parquet"))
    assert len(arxiv_files) == -(-per_cat["arxiv"] // 3) and arxiv_files[0].name.endswith(f"-of-{len(arxiv_files):05d}.parquet")

    head, body = _card(ds_dir / "README.md")
    assert head["license"] == "other" and head["size_categories"] == ["n<1K"]
    assert [c["config_name"] for c in head["configs"]] == ["all", "arxiv", "book", "code"]
    one = datasets.load_dataset(str(ds_dir), "code", cache_dir=str(tmp_path / "hf"))["train"]
    assert one.num_rows == per_cat["code"] and set(one["category"]) == {"code"}
    assert "`scorer=longattn`" in body and "tiny_llama" in body and f"W = {W} tokens" in body
    metrics = json.loads((out / "metrics.json").read_text())
    for cat, n in per_cat.items():  # the contents table: category | windows in | kept | ...
        row = next(line for line in body.splitlines() if line.startswith(f"| {cat} | "))
        assert row.split(" | ")[1:3] == [str(metrics["categories"][cat]["windows_in"]), str(n)]
    assert "alpha** = 0.5" in body and "`zscore`" in body and "select.fraction=0.5" in body
    assert "longattn.cli.select" in body and f"out_dir={out}" in body  # the exact command
    assert (ds_dir / "report.png").exists() and "(report.png)" in body
    assert (ds_dir / "selection_config.yaml").exists()

