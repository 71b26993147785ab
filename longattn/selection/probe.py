"""``longattn-probe``: does a scorer rank genuine long documents above concatenations of short texts?

Given records labelled 1 (one genuine long document) or 0 (short independent texts glued together), the
probe scores them with the ordinary selection stage (``run_select``, one window per record, the content cut
to ``window.length`` tokens by the scorer) and reports the AUROC of the selection score per category and
overall, for each normalisation and alpha, with the score distributions plotted per label. A Hydra
multirun compares scorers, models and settings (``-m scorer=longattn,prolong,random``); ``longattn-tables
--probe DIRS`` joins their tables. It can first build such a labelled set from unlabelled documents.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from longattn.common.errors import Choice, ConfigError
from longattn.common.io import atomic_writer, expand_inputs, iter_records, read_jsonl, write_json
from longattn.common.models import ModelConfig
from longattn.selection.config import (
    DataConfig,
    Normalize,
    ReportConfig,
    SelectConfig,
    SelectRunConfig,
    WindowConfig,
)
from longattn.selection.config import register_configs as register_select_configs
from longattn.selection.lds import lds_scores
from longattn.selection.records import InputNotes, OnError

log = logging.getLogger("longattn.selection.probe")

__all__ = ["auroc", "probe_table", "build_labelled", "run_probe", "ProbeRunConfig", "markdown_table", "best_setting"]


# --- configs ----------------------------------------------------------------------------------------
@dataclass
class ProbeDataConfig:
    paths: list[str] = field(default_factory=list)
    """Labelled records (JSON Lines / .gz / parquet), or unlabelled documents when ``build.negatives`` is set."""
    text_key: str = "text"
    """Field of the text (``content`` is used when it is absent)."""
    label_key: str = "label"
    """Field of the label: 1 = genuine long document, 0 = concatenation of short texts."""
    id_key: str = "id"
    """Field of the record id (falls back to category + counter)."""
    per_group: int | None = None
    """Keep at most this many records per (category, label), in input order (small CI probes); null = all."""


class Negatives(Choice):
    concat = "concat"
    """Short documents of a category glued together."""
    shuffle = "shuffle"
    """Blocks of several long documents interleaved."""


@dataclass
class BuildConfig:
    negatives: Negatives | None = None
    """null: ``data.paths`` are labelled already. ``concat``: positives = documents of at least ``chars``
    characters, negatives = short documents (< ``short_chars``) of a category glued to ``chars``. ``shuffle``:
    positives = long documents, negatives = blocks of ``group`` long documents interleaved."""
    chars: int = 40000
    """Characters per built record (40,000 ~ 10k tokens: more than the usual probe window)."""
    short_chars: int = 4000
    """``concat``: documents shorter than this are the short pieces."""
    block_chars: int = 2000
    """``shuffle``: characters per block."""
    group: int = 4
    """``shuffle``: long documents whose blocks are interleaved into as many negatives."""
    category_key: str = "category"
    """Field of the category (records without it: ``default``)."""


@dataclass
class ProbeRunConfig:
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    window: WindowConfig = field(default_factory=lambda: WindowConfig(length=2048))
    model: ModelConfig = field(default_factory=ModelConfig)
    scorer: Any = MISSING
    """The scorer's own config (``scorer=`` group: longattn, prolong, random)."""
    normalize: list[Normalize] = field(default_factory=lambda: [Normalize.zscore, Normalize.minmax])
    """Normalisations of the selection score to report (per category, as the selection)."""
    alpha: list[float] = field(default_factory=lambda: [0.5])
    """Values of alpha to report (LDS = norm(DS) - alpha * norm(Var))."""
    tag: str | None = None
    """Row name in the tables; null = ``scorer/model``."""
    out_dir: str = "runs/probe"
    """Run directory (the scoring run is ``out_dir/select`` and resumes)."""
    plot: bool = True
    """Write ``probe.png`` (score distributions per category and label)."""


def validate(cfg: ProbeRunConfig) -> None:
    if not cfg.data.paths:
        raise ConfigError("data.paths is empty: give labelled records, e.g. data.paths=[data/sample_corpus.jsonl.gz]")
    cfg.data.paths = expand_inputs(cfg.data.paths)
    if cfg.build.group < 2:
        raise ConfigError(f"build.group={cfg.build.group} must be >= 2")
    cfg.scorer.validate(cfg.window.length)


# --- the science (pure) -----------------------------------------------------------------------------
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U / n1 n0).

    NaN when one class is absent.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = mid_rank[inverse]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def probe_table(rows: list[dict[str, Any]], normalize: list[str], alphas: list[float]) -> list[dict[str, Any]]:
    """AUROC per category and overall for each (normalisation, alpha), from rows with ``category``,
    ``label``, ``ds``, ``var``. Scores are normalised within each category, as the selection does; the
    overall AUROC pools those per-category scores."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    out = []
    for method in normalize:
        for alpha in alphas:
            entry: dict[str, Any] = {"normalize": method, "alpha": alpha, "n": len(rows), "categories": {}}
            pooled_s, pooled_y = [], []
            for cat, rs in sorted(by_cat.items()):
                s = lds_scores(np.array([r["ds"] for r in rs]), np.array([r["var"] for r in rs]),
                               alpha=alpha, method=method)
                y = np.array([int(r["label"]) for r in rs])
                entry["categories"][cat] = auroc(s, y)
                pooled_s.append(s)
                pooled_y.append(y)
            entry["overall"] = auroc(np.concatenate(pooled_s), np.concatenate(pooled_y)) if rows else float("nan")
            out.append(entry)
    return out


def _cut(text: str, n: int) -> str:
    return text[:n]


def build_labelled(records: Iterator[dict[str, Any]], cfg: BuildConfig, text_key: str,
                   ) -> Iterator[dict[str, Any]]:
    """Labelled records from unlabelled documents (see ``BuildConfig.negatives``), streamed per category."""
    pending: dict[str, list[str]] = defaultdict(list)
    for r in records:
        text = r.get(text_key, r.get("content"))
        if not isinstance(text, str):
            continue
        cat = str(r.get(cfg.category_key) or "default")
        if cfg.negatives == Negatives.concat:
            if len(text) >= cfg.chars:
                yield {"category": cat, "label": 1, "text": _cut(text, cfg.chars)}
            elif len(text) < cfg.short_chars:
                pending[cat].append(text)
                if sum(len(t) + 2 for t in pending[cat]) - 2 >= cfg.chars:  # joined length
                    yield {"category": cat, "label": 0, "text": _cut("\n\n".join(pending.pop(cat)), cfg.chars)}
        elif len(text) >= cfg.chars:  # shuffle
            pending[cat].append(_cut(text, cfg.chars))
            if len(pending[cat]) == cfg.group:
                yield from _shuffled(pending.pop(cat), cat, cfg)


def _shuffled(docs: list[str], cat: str, cfg: BuildConfig) -> Iterator[dict[str, Any]]:
    """Each document as a positive, and as many negatives: negative m takes block b from document m + b."""
    blocks = [[d[i : i + cfg.block_chars] for i in range(0, len(d), cfg.block_chars)] for d in docs]
    n_blocks = min(len(b) for b in blocks)
    for m, d in enumerate(docs):
        yield {"category": cat, "label": 1, "text": d}
        mixed = "".join(blocks[(m + b) % len(docs)][b] for b in range(n_blocks))
        yield {"category": cat, "label": 0, "text": mixed}


# --- the run ----------------------------------------------------------------------------------------
def _labelled(cfg: ProbeRunConfig) -> Iterator[dict[str, Any]]:
    notes = InputNotes()  # logs damaged files and counts repairs; unusable records are left out of the probe
    recs = (rec.record for rec in iter_records(list(cfg.data.paths))
            if notes.read(rec, OnError.skip) is None and rec.record is not None)
    if cfg.build.negatives:
        yield from build_labelled(recs, cfg.build, cfg.data.text_key)
    else:
        yield from recs


def write_probe_input(cfg: ProbeRunConfig, path: Path) -> int:
    """The labelled records as reference-format windows (``data_id``, ``content``, ``category``, ``label``)."""
    seen: dict[tuple[str, int], int] = defaultdict(int)
    n = 0
    with atomic_writer(path) as f:
        for r in _labelled(cfg):
            text = r.get(cfg.data.text_key, r.get("content"))
            label = r.get(cfg.data.label_key)
            if not isinstance(text, str) or label is None:
                continue
            cat, label = str(r.get("category") or "default"), int(label)
            if cfg.data.per_group is not None and seen[(cat, label)] >= cfg.data.per_group:
                continue
            seen[(cat, label)] += 1
            n += 1
            did = str(r.get(cfg.data.id_key) or f"{cat}_{n:07d}")
            f.write(json.dumps({"data_id": did, "content": text, "category": cat, "label": label},
                               ensure_ascii=False) + "\n")
    return n


def run_probe(cfg: ProbeRunConfig, on_checked: Callable[[], None] | None = None) -> dict[str, Any]:
    """Score the labelled set (resumable) and write ``probe.json``, ``probe.md`` and ``probe.png``.

    ``on_checked`` runs once ``out_dir`` is locked and its fingerprints match (the entry point saves
    ``config.yaml`` there, so a refused rerun leaves it untouched)."""
    from longattn.common.lock import OutDirLock

    with OutDirLock(cfg.out_dir):
        return _run_probe(cfg, on_checked)


def _probe_input(cfg: ProbeRunConfig, out: Path, on_checked: Callable[[], None] | None) -> Path:
    """``probe_input.jsonl``, kept between runs (its data_ids key the resumable scoring run): refused when it
    was made from other settings or other input content."""
    from dataclasses import asdict

    from longattn.selection.fingerprints import InputsFingerprint, ResumeRefused, check_fingerprint

    inp = out / "probe_input.jsonl"
    fields = {**{f"data.{k}": v for k, v in asdict(cfg.data).items() if k != "paths"},
              **{f"build.{k}": v for k, v in asdict(cfg.build).items()}}
    check_fingerprint(out, "probe_input", fields, write=False)
    inputs = InputsFingerprint(out / "probe_input.inputs.json", list(cfg.data.paths))
    if inp.exists() and (changes := inputs.changes()):
        raise ResumeRefused(f"{inp} was made from other input content ({'; '.join(changes)}): use a new out_dir, "
                            f"or delete {inp} and {out / 'select'} to redo it")
    if on_checked is not None:
        on_checked()
    check_fingerprint(out, "probe_input", fields)
    if not inp.exists():
        inputs.record()
        write_probe_input(cfg, inp)
        inputs.complete()
    return inp


def _run_probe(cfg: ProbeRunConfig, on_checked: Callable[[], None] | None) -> dict[str, Any]:
    from longattn.selection.run import run_select

    out = Path(cfg.out_dir)
    inp = _probe_input(cfg, out, on_checked)
    labels = {r["data_id"]: r["label"] for r in read_jsonl(inp)}
    sel_cfg = SelectRunConfig(
        data=DataConfig(paths=[str(inp)], preprocessed=True), window=cfg.window, model=cfg.model,
        scorer=cfg.scorer, select=SelectConfig(), report=ReportConfig(enabled=False), out_dir=str(out / "select"))
    result = run_select(sel_cfg)
    rows = [{**r, "label": labels[r["data_id"]]} for r in read_jsonl(result.out_dir / "scores.jsonl")]
    tag = cfg.tag or f"{cfg.scorer.name}/{cfg.model.name}"
    table = probe_table(rows, list(cfg.normalize), [float(a) for a in cfg.alpha])
    res = {"tag": tag, "scorer": cfg.scorer.name, "model": cfg.model.name, "window_length": cfg.window.length,
           "scorer_config": OmegaConf.to_container(OmegaConf.structured(cfg.scorer)),
           "seconds_per_window": (result.metrics or {}).get("seconds_per_window"), "results": table}
    write_json(out / "probe.json", res)
    (out / "probe.md").write_text(markdown_table([res]) + "\n")
    if cfg.plot and rows:
        plot_distributions(rows, out / "probe.png", tag, table[0])
    return res


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One line per (run, normalisation, alpha): AUROC per category and overall."""
    cats = sorted({c for res in results for e in res["results"] for c in e["categories"]})
    head = ["config", "normalize", "alpha", *cats, "overall", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for e in res["results"]:
            vals = [f"{e['categories'].get(c, float('nan')):.3f}" for c in cats]
            lines.append(f"| {res['tag']} | {e['normalize']} | {e['alpha']:g} | " + " | ".join(vals)
                         + f" | {e['overall']:.3f} | {e['n']} |")
    return "\n".join(lines)


def best_setting(results: list[dict[str, Any]]) -> str:
    """The (run, normalisation, alpha) with the highest overall AUROC, as a sentence."""
    cands = [(e["overall"], res["tag"], e) for res in results for e in res["results"] if e["overall"] == e["overall"]]
    if not cands:
        return "no AUROC computed"
    auc, tag, e = max(cands, key=lambda c: c[0])
    return f"best separation: {tag} ({e['normalize']}, alpha {e['alpha']:g}): overall AUROC {auc:.3f}"


def plot_distributions(rows: list[dict[str, Any]], path: Path, tag: str, setting: dict[str, Any]) -> None:
    """Histograms of the selection score per category, label 1 against label 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = sorted({r["category"] for r in rows})
    fig, axes = plt.subplots(1, len(cats), figsize=(4 * len(cats), 3.2), squeeze=False)
    for ax, cat in zip(axes[0], cats, strict=True):
        rs = [r for r in rows if r["category"] == cat]
        s = lds_scores(np.array([r["ds"] for r in rs]), np.array([r["var"] for r in rs]),
                       alpha=setting["alpha"], method=setting["normalize"])
        y = np.array([int(r["label"]) for r in rs])
        bins = np.linspace(s.min(), s.max() + 1e-12, 16)
        ax.hist(s[y == 1], bins=bins, alpha=0.6, label="1: long document")
        ax.hist(s[y == 0], bins=bins, alpha=0.6, label="0: concatenation")
        ax.set_title(f"{cat}: AUROC {setting['categories'][cat]:.3f}")
        ax.set_xlabel(f"score ({setting['normalize']}, alpha {setting['alpha']:g})")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(tag)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def register_configs() -> None:
    register_select_configs()
    ConfigStore.instance().store(name="probe_schema", node=ProbeRunConfig)
