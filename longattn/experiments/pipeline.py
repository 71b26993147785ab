"""``longattn-pipeline``: one experiment point, raw documents -> selected windows -> model -> scores.

Each stage is its own Hydra app (``longattn-select``, ``longattn-train``, ``longattn-eval``); a point gives
each stage its overrides (``conf/experiment/*.yaml``). A stage's output directory is named by the hash of
its resolved config and of the stages it reads from (content addressing), and holds a ``DONE`` marker once
finished, so rerunning a point skips what exists, and two points that share a stage (same selection for
several training budgets) run it once. Stages run as subprocesses of their own entry points, so their
launchers (torchrun, SLURM) work as they do alone.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from longattn.common.hydra_app import CONF_DIR
from longattn.common.io import json_digest, write_json
from longattn.common.tracking import WandbConfig

log = logging.getLogger(__name__)

__all__ = ["PipelineConfig", "StageConfig", "STAGES", "plan_point", "run_point", "excluded", "register_configs"]


@dataclass(frozen=True)
class StageApp:
    """How to run one stage: its module (``python -m``), primary config, and where its outputs link in."""

    module: str
    config_name: str
    done_file: str
    """A file the stage writes only when it finished (checked besides the pipeline's DONE marker)."""
    schemas: str
    """Module whose ``register_configs()`` puts the stage's schemas in Hydra's ConfigStore (no heavy imports)."""
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Config key -> (upstream stage, path inside its out_dir): how the stage reads an earlier stage's output."""

    def register(self) -> None:
        importlib.import_module(self.schemas).register_configs()


STAGES: dict[str, StageApp] = {
    "select": StageApp("longattn.cli.select", "select", "selected.jsonl", "longattn.selection.config"),
    "train": StageApp("longattn.cli.train", "train", "hf/config.json", "train.config",
                      {"data.selected": ("select", "")}),
    "eval": StageApp("longattn.cli.eval", "eval", "results.json", "eval.config", {"model.path": ("train", "hf")}),
}
"""The stages in order (a dict keeps it)."""


@dataclass
class StageConfig:
    enabled: bool = True
    """Run this stage (a point may stop after selection, e.g. the cost and statistics tables)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Hydra overrides of the stage's own config, key -> value (``model: llama31_8b``, ``select.tokens: 1.5e9``)."""


@dataclass
class PipelineConfig:
    name: str = "point"
    """The experiment point (one cell of a paper table), e.g. ``data_scale-longattn8-5e9``."""
    method: str = "longattn8"
    """Selection method (group ``method``: random, prolong, longattn8, longattn70): sets select's scorer / model."""
    method_label: str = "LongAttn-8"
    """The method as the paper's tables name it (Random, ProLong, LongAttn-8, LongAttn-70)."""
    tokens: float = 5e9
    """Training tokens of the point (the paper's x in D_Ax); long data is 30 % per category of it (Table 7)."""
    alpha: float = 0.5
    """LDS weight of the uniformity term given to selection (Table 4: 1.0 and 0.0 = w/o DU)."""
    root: str = "runs/experiments"
    """Stage outputs live in ``root/<stage>-<hash>``, shared across points."""
    select: StageConfig = field(default_factory=StageConfig)
    train: StageConfig = field(default_factory=StageConfig)
    eval: StageConfig = field(default_factory=StageConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Every stage logs to this project and group, with its stage as job type."""
    data: list[str] = field(default_factory=list)
    """Raw long documents (JSON Lines / Parquet with ``content`` and ``category``): select's data.paths."""
    short: dict[str, str | None] = field(default_factory=dict)
    """Short-context sources for training (wiki / github / web -> path): train's data.short."""
    paths: dict[str, Any] = field(default_factory=dict)
    """Local HF directories of the models (``paths.llama31_8b=/models/Llama-3.1-8B``), used by the methods."""
    python: str = ""
    """Interpreter for the stages; empty = this one."""
    dry_run: bool = False
    """Print the plan (stage, out_dir, overrides, done or not) and run nothing."""
    tags: dict[str, Any] = field(default_factory=dict)
    """Free labels of the point (method, scorer model, tokens) copied into ``point.json`` for the tables."""
    exclude: list[dict[str, Any]] = field(default_factory=list)
    """Cells of the experiment's sweep grid (``hydra.sweeper.params``) that its paper table does not have, e.g.
    ``{method: prolong, tokens: 2e10}``: such a point runs nothing and says so."""


def excluded(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The ``exclude`` entry this point matches (every key equal; numbers compared as numbers), if any."""

    def same(a: Any, b: Any) -> bool:
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return str(a) == str(b)

    for cell in cfg.exclude:
        if all(same(getattr(cfg, k), v) for k, v in cell.items()):
            return cell
    return None


def _value(v: Any) -> str:
    """A value in Hydra's override grammar."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    s = str(v)
    if isinstance(v, str) and (not s or any(c in s for c in " ,[]{}=:'\"()")):
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"  # quoted in the override grammar
    return s


def _overrides(d: dict[str, Any]) -> list[str]:
    return [f"{k}={_value(v)}" for k, v in d.items()]


def _compose(app: StageApp, overrides: list[str]) -> dict[str, Any]:
    """The stage's resolved config (Hydra's compose API), without its out_dir: what its hash names."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    app.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=app.config_name, overrides=overrides)
    d = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(d, dict)
    d.pop("out_dir", None)
    d.pop("hydra", None)
    d.pop("wandb", None)  # logging does not change outputs
    return d


def plan_point(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Stages in order with their overrides (inputs linked to upstream outputs) and content-addressed dirs."""
    steps: list[dict[str, Any]] = []
    upstream: dict[str, str] = {}
    for stage, app in STAGES.items():
        scfg: StageConfig = getattr(cfg, stage)
        if not scfg.enabled:
            continue
        links = {key: str(Path(upstream[src]) / rel) if rel else upstream[src]
                 for key, (src, rel) in app.inputs.items() if src in upstream}
        overrides = _overrides({**scfg.overrides, **links})
        key = json_digest({"stage": stage, "config": _compose(app, overrides)})
        out_dir = str(Path(cfg.root) / f"{stage}-{key}")
        upstream[stage] = out_dir
        steps.append({"stage": stage, "out_dir": out_dir, "overrides": overrides,
                      "done": (Path(out_dir) / "DONE").exists() and (Path(out_dir) / app.done_file).exists()})
    return steps


def _wandb_overrides(cfg: PipelineConfig, stage: str) -> list[str]:
    w = cfg.wandb
    if not w.enabled:
        return []
    return ["wandb.enabled=true", f"wandb.project={w.project}", f"wandb.group={w.group or cfg.name}",
            f"wandb.job_type={stage}", f"wandb.name={cfg.name}-{stage}"]


def run_point(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Run the point's stages in order, skipping finished ones; write ``root/points/<name>.json``."""
    steps = plan_point(cfg)
    for step in steps:
        app = STAGES[step["stage"]]
        status = "done, skipped" if step["done"] else ("dry run" if cfg.dry_run else "running")
        log.info("%s: %s -> %s (%s)", cfg.name, step["stage"], step["out_dir"], status)
        if step["done"] or cfg.dry_run:
            continue
        cmd = [cfg.python or sys.executable, "-m", app.module, *step["overrides"], f"out_dir={step['out_dir']}",
               *_wandb_overrides(cfg, step["stage"])]
        proc = subprocess.run(cmd, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"{cfg.name}: stage {step['stage']} failed ({' '.join(cmd)})")
        write_json(Path(step["out_dir"]) / "DONE", {"point": cfg.name, "overrides": step["overrides"]})
        step["done"] = True
    if not cfg.dry_run:
        write_json(Path(cfg.root) / "points" / f"{cfg.name}.json",
                   {"name": cfg.name, "tags": dict(cfg.tags), "stages": steps})
    return steps


def register_configs() -> None:
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
