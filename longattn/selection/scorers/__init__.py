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

__all__ = ["Scorer", "SCORERS", "register_scorer", "build_scorer", "stats_row", "SCORER_MODULES"]


class Scorer(Protocol):
    load_seconds: float

    def score(self, windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows with at least ``data_id``, ``category``, ``n_tokens``, ``ds``, ``var`` for each window.

        ``ds`` is the quantity ranked first (higher is better) and ``var`` the one penalised by alpha;
        a scorer with a single score sets ``var`` to 0.
        """
        ...


SCORERS: dict[str, tuple[type, Callable[..., Scorer]]] = {}
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
