"""Typed config schemas of the selection stage, registered with Hydra's ConfigStore.

YAML files under ``conf/`` only set values; every field is documented here, where it is declared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from longattn.common.errors import Choice, ConfigError
from longattn.common.io import expand_inputs
from longattn.common.models import ModelConfig, ModelSource
from longattn.common.tracking import WandbConfig
from longattn.selection.dataset import DatasetConfig
from longattn.selection.records import OnError, read_category
from longattn.selection.shards import ShardConfig, Stage

__all__ = ["ConfigError", "ModelConfig", "DataConfig", "OnError", "OnChange", "WindowConfig", "ScorerConfig", "SelectConfig", "Normalize", "Overlap",
           "ReportConfig", "SelectRunConfig", "validate", "register_configs"]


class Normalize(Choice):
    zscore = "zscore"
    """Z-score over the scored set, sample std (the paper)."""
    minmax = "minmax"
    """Min-max to [0, 1], all-equal values -> 0.5 (the reference code)."""


class Overlap(Choice):
    allow = "allow"
    """Windows are ranked alone, overlapping windows of one document may both be kept (the reference)."""
    drop = "drop"
    """Never keep two windows of one document whose token ranges overlap: the better one is kept and the
    next-best window takes the freed budget."""


class OnChange(Choice):
    refuse = "refuse"
    """Stop, naming the changed input files (keep the outputs made from the old content)."""
    redo = "redo"
    """Delete the outputs made from the old content and redo the run from scratch."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Input files: ``.jsonl``, ``.jsonl.gz``, ``.json`` (JSON Lines, or ``key<TAB>{json}`` lines) or ``.parquet``;
    gzip is recognised by content. A directory stands for the input files under it (recursive, sorted)."""
    text_key: str = "content"
    """Record field holding the document text (``text`` is also accepted when this one is absent)."""
    category: str = "default"
    """Category of records that carry no ``category`` field (the paper: arxiv, book, code). Categories are
    stripped and lower-cased, integers become their digits; any other type makes the record malformed."""
    preprocessed: bool = False
    """Inputs are already windows in the reference format (``content``, ``data_id``): skip pre-processing."""
    id_key: str = "id"
    """Record field used as the source document id (falls back to ``file:line``)."""
    on_error: OnError = OnError.skip
    """A damaged input file (truncated gzip, corrupt Parquet): ``skip`` keeps the records before the damage and
    counts the rest as ``unreadable``; ``fail`` stops the run naming the file and line."""
    on_change: OnChange = OnChange.refuse
    """A rerun finds an input whose content changed since its outputs were made: ``refuse`` (naming the file)
    or ``redo`` (delete those outputs and start again)."""


@dataclass
class WindowConfig:
    length: int = 32768
    """Window length W in tokens (the scorer pads/truncates to it; k = L/4 needs it divisible by 4)."""
    id_prefix: str = "{category}_"
    """data_id prefix; ``{category}`` is replaced; ids are prefix + 7-digit counter (reference: ``sample_0000001``)."""
    sample_size: int | None = None
    """Keep a seeded random sample of this many windows per category (the reference's ``sample_data``); null = all."""
    sample_seed: int = 12
    """Seed of the sampling (Python ``random``, as the reference)."""
    workers: int = 2
    """Tokeniser processes for pre-processing."""
    batch_docs: int = 16
    """Documents per tokenisation task."""


@dataclass
class ScorerConfig:
    """Base of every scorer's config (each scorer module declares its own subclass)."""

    name: str = "longattn"
    """Registry key of the scorer (``longattn.selection.scorers``)."""
    batch_size: int = 1
    """Windows per scoring call."""

    def validate(self, length: int) -> None:
        """Scorer-specific checks; raise ``ConfigError`` naming the key to change."""


@dataclass
class SelectConfig:
    fraction: float | None = 0.5
    """Keep this fraction of windows per category (reference: top 50 %). Ignored when ``tokens`` is set."""
    tokens: float | None = None
    """Per-category token budget (accepts 1.5e9); windows taken in LDS order while they fit."""
    normalize: Normalize = Normalize.zscore
    """``zscore`` (the paper) or ``minmax`` (the reference code)."""
    alpha: float = 0.5
    """Weight of the uniformity term: LDS = norm(DS) - alpha * norm(Var). Table 4: 1.0 and 0 (w/o DU)."""
    write_rejected: bool = True
    """Also write ``rejected.jsonl`` (windows not kept, with their scores)."""
    overlap: Overlap = Overlap.allow
    """``allow`` (the reference: Algorithm 1's overlapping windows compete alone) or ``drop`` (docs/method.md
    §1: at most one of any overlapping pair of one document, by LDS). metrics.json reports duplicated tokens."""


@dataclass
class ReportConfig:
    enabled: bool = True
    """Write ``report.png`` and ``report.md``."""
    top_k: int = 5
    """Top and bottom windows listed per category in ``report.md``."""


@dataclass
class SelectRunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scorer: Any = MISSING
    """The scorer's own config (its schema comes with the ``scorer=`` group: longattn, ...)."""
    select: SelectConfig = field(default_factory=SelectConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    """``out_dir/dataset/``: the kept windows as Parquet shards with a Hugging Face dataset card (optional upload)."""
    shard: ShardConfig = field(default_factory=ShardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B logging of the merged run: counts, per-category statistics, score histograms, the selected set."""
    out_dir: str = "runs/select"
    """Run directory: every output goes here; a rerun with the same out_dir resumes."""
    stage: Stage = Stage.all
    """``all``: pre-process, score and merge; ``preprocess``: only pre-process this rank's pieces (a CPU job
    array), so that the scoring jobs start on prepared windows."""
    log_every: int = 1000
    """Windows between progress lines of a rank (and at least one line a minute)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form tags recorded in metrics.json (experiment name, W&B group...)."""


def validate(cfg: SelectRunConfig) -> None:
    """Check and derive before any side effect; errors name the key to change."""
    W = cfg.window.length
    if W < 8:
        raise ConfigError(f"window.length={W} is too small (at least 8 tokens)")
    cfg.scorer.validate(W)
    if not cfg.data.paths:
        raise ConfigError("data.paths is empty: give input files, e.g. data.paths=[corpus.jsonl.gz]")
    if cfg.select.tokens is None and cfg.select.fraction is None:
        raise ConfigError("set select.fraction=F or select.tokens=T")
    if cfg.select.tokens is not None and float(cfg.select.tokens) <= 0:
        raise ConfigError(f"select.tokens={cfg.select.tokens} must be positive")
    if cfg.select.fraction is not None and not 0.0 <= float(cfg.select.fraction) <= 1.0:
        raise ConfigError(f"select.fraction={cfg.select.fraction} must be in [0, 1]")
    if cfg.model.source == ModelSource.hf and not cfg.model.path:
        raise ConfigError(f"model={cfg.model.name} needs model.path=/path/to/hf/model/dir")
    if cfg.model.source == ModelSource.hf and not os.path.isdir(os.path.expanduser(cfg.model.path)):
        raise ConfigError(f"model.path={cfg.model.path}: not a directory (a HF model directory with config.json, "
                          "tokenizer files and safetensors)")
    cfg.data.paths = expand_inputs(cfg.data.paths)
    category, why = read_category(cfg.data.category, "")
    if not category:
        raise ConfigError(f"data.category={cfg.data.category!r}: {why or 'must not be blank'}")
    cfg.data.category = category
    if cfg.model.source == ModelSource.random and not cfg.model.tokenizer:
        raise ConfigError(f"model={cfg.model.name} (random) needs model.tokenizer=DIR_OR_GGUF")
    cfg.shard.validate()
    if cfg.dataset.shard_rows < 1:
        raise ConfigError(f"dataset.shard_rows={cfg.dataset.shard_rows} must be >= 1")
    if cfg.log_every < 1:
        raise ConfigError(f"log_every={cfg.log_every} must be >= 1")
    if cfg.stage == Stage.preprocess and cfg.data.preprocessed:
        raise ConfigError("stage=preprocess has nothing to do with data.preprocessed=true (the inputs are windows)")
    if cfg.window.workers < 1:
        raise ConfigError(f"window.workers={cfg.window.workers} must be >= 1")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="select_schema", node=SelectRunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    from longattn.selection.scorers import SCORERS, _load_registry

    _load_registry()
    for name, (config_cls, _) in SCORERS.items():
        cs.store(group="scorer", name=f"{name}_schema", node=config_cls)
