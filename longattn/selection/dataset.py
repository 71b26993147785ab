"""A selection run as a dataset: ``out_dir/dataset/`` holds Parquet shards of the kept windows and a Hugging
Face dataset card (``README.md``) that says what they are and how they were chosen.

    dataset/
      README.md                                   the card: YAML header (configs per category, size, licence)
      report.png                                  score distributions (the run's report figure)
      selection_config.yaml                       the resolved config of the run
      data/<category>/train-00000-of-00001.parquet

``datasets.load_dataset("parquet", data_dir="out_dir/dataset")`` loads every category as one ``train`` split;
``datasets.load_dataset("out_dir/dataset", "arxiv")`` one category through the card's ``configs``. With
``dataset.push_to_hub=user/name`` the directory is uploaded with ``huggingface_hub`` after the run.

The kept windows are streamed: ``selected.jsonl`` (content) and the kept rows of ``scores.jsonl`` (scores,
where the window comes from) are both in input order and are read in lockstep.
"""

from __future__ import annotations

import logging
import math
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longattn.common.io import iter_records, read_jsonl

if TYPE_CHECKING:
    from longattn.selection.config import SelectRunConfig

log = logging.getLogger(__name__)

__all__ = ["DatasetConfig", "write_dataset", "push_to_hub", "size_category", "hub_license", "invocation"]

OFFSET_KEYS = ("token_start", "token_end")
"""Token offsets of a window in its source document, written when the windows carry them."""
SCORE_KEYS = ("ds", "var", "lds")


@dataclass
class DatasetConfig:
    enabled: bool = True
    """Write ``out_dir/dataset/``: Parquet shards of the kept windows and a Hugging Face dataset card."""
    shard_rows: int = 10000
    """Windows per Parquet shard (10,000 windows of 32k tokens is ~1.3 GB of text)."""
    pretty_name: str | None = None
    """Title of the card; null = ``<scorer> selection with <model>, <W>-token windows``."""
    push_to_hub: str | None = None
    """Hub dataset repository (``user/name``) to upload ``dataset/`` to after the run with ``huggingface_hub``
    (token from ``HF_TOKEN`` or ``hf auth login``); null = local only."""
    private: bool = True
    """Create the Hub repository private (only when it does not exist yet)."""
    tags: list[str] = field(default_factory=lambda: ["long-context", "data-selection"])
    """Tags of the card (the scorer's name is added)."""
    license_key: str | None = "license"
    """Field of the input records with their licence, carried into the card and a ``license`` column (the
    windows do not carry it, so the input files are read once more); null = no licence, no extra pass."""


# --- pure helpers ---------------------------------------------------------------------------------------
_SIZE_BOUNDS = [(1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"), (1e7, "1M<n<10M"),
                (1e8, "10M<n<100M"), (1e9, "100M<n<1B"), (1e10, "1B<n<10B"), (1e11, "10B<n<100B"),
                (1e12, "100B<n<1T")]


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` rows."""
    return next((name for bound, name in _SIZE_BOUNDS if n < bound), "n>1T")


# Licence identifiers the Hub accepts in a card's ``license`` field (the ones input corpora commonly carry).
_HUB_LICENSES = {"apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-3.0",
                 "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "gpl", "gpl-2.0", "gpl-3.0", "lgpl-3.0",
                 "agpl-3.0", "gfdl", "lppl-1.3c", "mpl-2.0", "artistic-2.0", "odc-by", "odbl", "pddl", "unlicense"}


def hub_license(licenses: list[str]) -> dict[str, Any]:
    """Card header fields for the licences of the input records: the Hub id when there is one recognised
    licence, else ``other`` with a ``license_name`` (the records' own values are listed in the card body)."""
    if not licenses:
        return {}
    if len(licenses) == 1 and licenses[0].strip().lower() in _HUB_LICENSES:
        return {"license": licenses[0].strip().lower()}
    name = "mixed" if len(licenses) > 1 else licenses[0]
    slug = "".join(c if c.isalnum() or c in ".-" else "-" for c in name.lower()).strip("-")
    return {"license": "other", "license_name": slug or "other"}


def invocation() -> str:
    """The command line of this process, as a person would retype it (``python -m module`` or the script)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name.removesuffix(".__main__") if spec is not None and spec.name else None
    head = ["python", "-m", module] if module else [Path(sys.argv[0]).name]
    return shlex.join([*head, *sys.argv[1:]])


@dataclass
class _Stats:
    """Per-category running numbers of the kept windows."""

    rows: int = 0
    tokens: int = 0
    lo: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SCORE_KEYS, math.inf))
    hi: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SCORE_KEYS, -math.inf))
    total: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SCORE_KEYS, 0.0))
    licenses: dict[str, int] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        self.tokens += int(row["n_tokens"] or 0)
        for k in SCORE_KEYS:
            v = float(row[k])
            self.lo[k], self.hi[k] = min(self.lo[k], v), max(self.hi[k], v)
            self.total[k] += v
        if row.get("license"):
            self.licenses[row["license"]] = self.licenses.get(row["license"], 0) + 1


# --- reading the run ------------------------------------------------------------------------------------
def _licenses(cfg: SelectRunConfig) -> dict[str, str]:
    """source id (and ``file:line``, and ``data_id`` for window inputs) -> the input record's licence
    (``dataset.license_key``), from one more pass over the input files; {} when the key is null."""
    key = cfg.dataset.license_key
    out: dict[str, str] = {}
    for rec in iter_records(list(cfg.data.paths) if key else []):
        r = rec.record
        if not r or not isinstance(r.get(key), str):
            continue
        # the key a window names its document by: source_id = the id field, else file:line (data_id: window inputs)
        k = r.get(cfg.data.id_key) if r.get(cfg.data.id_key) is not None else (r.get("data_id") or rec.where)
        out[str(k)] = sys.intern(r[key])  # one string per distinct licence
    return out


def kept_rows(out_dir: Path, licenses: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The kept windows with their scores, provenance and licence, in input order."""
    scores = (r for r in read_jsonl(out_dir / "scores.jsonl") if r.get("kept"))
    for sel in read_jsonl(out_dir / "selected.jsonl"):
        row = next(scores, None)
        if row is None or row["data_id"] != sel["data_id"]:
            raise RuntimeError(f"{out_dir}: selected.jsonl and the kept rows of scores.jsonl disagree at "
                               f"{sel['data_id']} (got {None if row is None else row['data_id']})")
        source = row.get("source_id") or sel.get("source_id")
        lic = sel.get("license") or licenses.get(str(source)) or licenses.get(sel["data_id"])
        yield {"content": sel["content"], "data_id": sel["data_id"], "category": sel["category"],
               "source_id": None if source is None else str(source),
               **{k: row[k] for k in OFFSET_KEYS if k in row},
               "n_tokens": int(row.get("n_tokens") or 0), **{k: float(row[k]) for k in SCORE_KEYS},
               **({"license": lic} if lic else {})}


# --- writing --------------------------------------------------------------------------------------------
def _schema(first: dict[str, Any], with_license: bool) -> Any:
    import pyarrow as pa

    fields = [("content", pa.string()), ("data_id", pa.string()), ("category", pa.string()),
              ("source_id", pa.string())]
    fields += [(k, pa.int64()) for k in OFFSET_KEYS if k in first]
    fields += [("n_tokens", pa.int64()), *((k, pa.float64()) for k in SCORE_KEYS)]
    if with_license:
        fields.append(("license", pa.string()))
    return pa.schema(fields)


class _ShardWriter:
    """Parquet shards per category, ``shard_rows`` rows each; renamed ``-of-N`` when the count is known."""

    def __init__(self, root: Path, schema: Any, shard_rows: int):
        self.root, self.schema, self.shard_rows = root, schema, shard_rows
        self.buffers: dict[str, list[dict[str, Any]]] = {}
        self.files: dict[str, list[Path]] = {}

    def add(self, row: dict[str, Any]) -> None:
        buf = self.buffers.setdefault(row["category"], [])
        buf.append(row)
        if len(buf) >= self.shard_rows:
            self._flush(row["category"])

    def _flush(self, cat: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = self.buffers.pop(cat, [])
        if not rows:
            return
        files = self.files.setdefault(cat, [])
        path = self.root / "data" / cat / f"train-{len(files):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([{k: r.get(k) for k in self.schema.names} for r in rows], schema=self.schema)
        pq.write_table(table, path)
        files.append(path)

    def close(self) -> dict[str, list[str]]:
        for cat in list(self.buffers):
            self._flush(cat)
        out = {}
        for cat, files in self.files.items():
            named = []
            for i, p in enumerate(files):
                final = p.with_name(f"train-{i:05d}-of-{len(files):05d}.parquet")
                p.rename(final)
                named.append(str(final.relative_to(self.root)))
            out[cat] = named
        return out


def write_dataset(cfg: SelectRunConfig, out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``out_dir/dataset/`` from the merged outputs (replacing an earlier one whole); upload it when
    ``dataset.push_to_hub`` is set. Returns the directory."""
    out_dir = Path(out_dir)
    final, tmp = out_dir / "dataset", out_dir / "dataset.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    licenses = _licenses(cfg)
    stats: dict[str, _Stats] = {}
    writer: _ShardWriter | None = None
    for row in kept_rows(out_dir, licenses):
        if writer is None:
            writer = _ShardWriter(tmp, _schema(row, bool(licenses)), cfg.dataset.shard_rows)
        writer.add(row)
        stats.setdefault(row["category"], _Stats()).add(row)
    files = writer.close() if writer is not None else {}
    for name, target in (("report.png", "report.png"), ("config.yaml", "selection_config.yaml")):
        if (out_dir / name).exists():
            shutil.copy(out_dir / name, tmp / target)
    from longattn.selection.dataset_card import dataset_card

    columns = list(writer.schema.names) if writer is not None else []
    card = dataset_card(cfg, metrics, stats, files, columns, invocation())
    (tmp / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    log.info("dataset: %d windows in %d categories -> %s", sum(s.rows for s in stats.values()), len(stats), final)
    if cfg.dataset.push_to_hub:
        push_to_hub(final, cfg.dataset.push_to_hub, private=cfg.dataset.private)
    return final


def push_to_hub(dataset_dir: str | Path, repo_id: str, *, private: bool = True) -> str:
    """Upload ``dataset_dir`` to the Hub dataset repository ``repo_id`` (created when missing); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(dataset_dir), repo_id=repo_id, repo_type="dataset",
                      commit_message="LongAttn selection: kept windows and dataset card")
    url = f"https://huggingface.co/datasets/{repo_id}"
    log.info("dataset: uploaded to %s", url)
    return url
