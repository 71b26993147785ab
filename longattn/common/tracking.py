"""Metric logging shared by all stages: always a local ``metrics.jsonl``; Weights & Biases when enabled.

``wandb`` is imported lazily, inside ``MetricsLogger``, so no stage needs it installed; with
``WANDB_MODE=offline`` runs are written locally and synced later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["WandbConfig", "MetricsLogger"]


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log to Weights & Biases (needs the ``wandb`` extra). Set ``WANDB_MODE=offline`` to log without network."""
    project: str = "longattn"
    """W&B project: one for the whole paper reproduction."""
    group: str | None = None
    """W&B group: one per experiment (set by the experiment configs)."""
    job_type: str | None = None
    """W&B job type: the stage (select, train, eval); set by each entry point."""
    name: str | None = None
    """Run name; null lets W&B choose."""
    tags: list[str] = field(default_factory=list)
    """Free tags."""
    dir: str | None = None
    """Where W&B writes its files; null = the run's out_dir."""


class MetricsLogger:
    """``log(metrics, step)`` appends a JSON line to ``out_dir/metrics.jsonl`` and mirrors it to W&B."""

    def __init__(self, out_dir: str | Path, cfg: WandbConfig | None = None, *, job_type: str,
                 config: dict[str, Any] | None = None, filename: str = "metrics.jsonl", rank: int = 0):
        self.path = Path(out_dir) / filename
        self.rank = rank
        self.run = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        cfg = cfg or WandbConfig()
        if cfg.enabled:
            import wandb  # lazily: an optional extra

            # A stable id per run directory and stage: a resumed run continues its W&B run.
            run_id = hashlib.sha256(f"{self.path.parent.resolve()}:{job_type}".encode()).hexdigest()[:16]
            self.run = wandb.init(project=cfg.project, group=cfg.group, job_type=cfg.job_type or job_type,
                                  name=cfg.name, tags=list(cfg.tags), config=config or {},
                                  dir=cfg.dir or str(self.path.parent), id=run_id, resume="allow",
                                  mode=os.environ.get("WANDB_MODE"))

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.rank != 0:
            return
        row = {"step": step, **metrics} if step is not None else dict(metrics)
        self._f.write(json.dumps(row, default=float) + "\n")
        self._f.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        """Final numbers of the run (W&B summary; the caller writes its own JSON)."""
        if self.run is not None:
            self.run.summary.update(metrics)

    def histograms(self, arrays: dict[str, Any], step: int | None = None) -> None:
        """Score distributions (W&B histograms); the local record is the caller's metrics.json."""
        if self.run is not None:
            import wandb

            self.run.log({k: wandb.Histogram(v) for k, v in arrays.items()}, step=step)

    def artifact(self, path: str | Path, name: str, type_: str) -> None:
        if self.run is not None:
            import wandb

            art = wandb.Artifact(name, type=type_)
            (art.add_dir if Path(path).is_dir() else art.add_file)(str(path))
            self.run.log_artifact(art)

    def close(self) -> None:
        if self.rank != 0:
            return
        self._f.close()
        if self.run is not None:
            self.run.finish()
            self.run = None
