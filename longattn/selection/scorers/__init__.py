"""Scorers turn windows into rows of statistics; selection, sharding and resume are shared by all.

Adding a scorer is one module here (a config dataclass and a class registered with ``register_scorer``)
and one config file under ``conf/scorer/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

from longattn.common.models import ModelConfig
from longattn.selection.config import ScorerConfig

__all__ = ["Scorer", "SCORERS", "register_scorer", "build_scorer", "stats_row", "SCORER_MODULES", "device_name", "score_windows"]


class Scorer(Protocol):
    """What the selection stage needs of a scorer: built from (its config, the model config, window length)."""

    load_seconds: float
    """Seconds spent loading the model and tokenizer (reported in metrics.json)."""

    @property
    def device(self) -> str:
        """Where it computes: ``cpu`` or the GPU's name (reported in metrics.json and the cost table)."""
        ...

    def prepare(self, windows: list[dict[str, Any]]) -> Any:
        """The CPU side of a batch (tokenising, padding), run in a thread while the previous batch is scored."""
        ...

    def score(self, windows: list[dict[str, Any]], prepared: Any) -> list[dict[str, Any]]:
        """Rows with at least ``data_id``, ``category``, ``n_tokens``, ``ds``, ``var`` for each window, from
        ``prepared = self.prepare(windows)``.

        ``ds`` is the quantity ranked first (higher is better) and ``var`` the one penalised by alpha;
        a scorer with a single score sets ``var`` to 0.
        """
        ...


def score_windows(scorer: Scorer, windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Prepare and score in one call (tests, benchmarks); the pipeline overlaps the two instead."""
    return scorer.score(windows, scorer.prepare(windows))


def device_name(device: torch.device | str) -> str:
    """``cpu``, or the name of the CUDA device (``NVIDIA H100 80GB HBM3``)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


SCORERS: dict[str, tuple[type[ScorerConfig], Callable[[Any, ModelConfig, int], Scorer]]] = {}
"""name -> (config dataclass, scorer class)."""
SCORER_MODULES = ["longattn.selection.scorers.longattn", "longattn.selection.scorers.prolong", "longattn.selection.scorers.random_scorer",
                  "longattn.selection.scorers.layers"]
"""Modules imported to fill the registry (each registers itself on import)."""


def register_scorer(name: str, config_cls: type) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        SCORERS[name] = (config_cls, cls)
        return cls

    return deco


def _load_registry() -> None:
    for mod in SCORER_MODULES:
        importlib.import_module(mod)


def build_scorer(cfg: ScorerConfig, model_cfg: ModelConfig, length: int) -> Scorer:
    _load_registry()
    if cfg.name not in SCORERS:
        raise KeyError(f"scorer={cfg.name!r} is unknown; known: {sorted(SCORERS)}")
    return SCORERS[cfg.name][1](cfg, model_cfg, length)


def stats_row(window: dict[str, Any], n_scored: int, ds: torch.Tensor, var: torch.Tensor) -> dict[str, Any]:
    """A scores.jsonl row: per-head values and their means over heads (as the reference averages)."""
    ds_h, var_h = ds.double().cpu(), var.double().cpu()
    return {
        "data_id": window["data_id"],
        "category": window["category"],
        "n_tokens": int(window.get("n_tokens") or n_scored),
        "n_scored": n_scored,
        "ds": float(ds_h.mean()),
        "var": float(var_h.mean()),
        "ds_heads": ds_h.tolist(),
        "var_heads": var_h.tolist(),
    }
