"""What every stage's Hydra entry point shares: where ``conf/`` is, and YAML -> validated dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from longattn.common.errors import ConfigError

T = TypeVar("T")

# ${mul:${tokens},0.3}: a token budget that is a fraction of another (per-category share of a training set).
if not OmegaConf.has_resolver("mul"):
    OmegaConf.register_new_resolver("mul", lambda a, b: float(a) * float(b))
# ${alpha_variant:${alpha}} -> the Table 4 row name of an LDS weight ("" for the paper's default 0.5).
if not OmegaConf.has_resolver("alpha_variant"):
    OmegaConf.register_new_resolver(
        "alpha_variant", lambda a: {0.5: "", 1.0: "alpha=1", 0.0: "w/o DU"}.get(float(a), f"alpha={float(a):g}"))
# ${repo:tests/data/x.jsonl} -> an absolute path inside this repository (committed sample data).
if not OmegaConf.has_resolver("repo"):
    OmegaConf.register_new_resolver("repo", lambda rel: str(Path(CONF_DIR).parent / rel))
# ${billions:${tokens}} -> "5B": readable names of experiment points.
if not OmegaConf.has_resolver("billions"):
    OmegaConf.register_new_resolver("billions", lambda x: f"{float(x) / 1e9:g}B")

# ${pid:} -> this process's id: each attempt (and each rank of a job) gets its own Hydra log folder.
if not OmegaConf.has_resolver("pid"):
    OmegaConf.register_new_resolver("pid", lambda: os.getpid())

# An absolute path: entry points must find conf/ from any working directory (and from installed scripts).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys of a typed node that its dataclass does not declare, each with the closest declared key.

    Hydra lets ``+key=value`` add a key to any node, and OmegaConf keeps it through ``to_object``: a typo such
    as ``+select.fracton=0.3`` would be accepted, saved and ignored.
    """
    out: list[str] = []
    schema = OmegaConf.get_type(cfg)
    if dataclasses.is_dataclass(schema):
        names = [f.name for f in dataclasses.fields(schema)]
        for k in cfg.keys():
            if k not in names:
                near = difflib.get_close_matches(str(k), names, n=1)
                out.append(f"{prefix}{k}" + (f" (did you mean {prefix}{near[0]}?)" if near else ""))
    for k in cfg.keys():
        child = cfg._get_node(k)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            out += unknown_keys(child, f"{prefix}{k}.")
    return out


def to_dataclass(schema: type[T], cfg: DictConfig, validate: Callable[[T], Any] | None = None) -> T:
    """Merge the composed YAML into the typed schema (type errors name the key), refuse keys the schema does
    not declare, then validate it."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    if unknown := unknown_keys(merged):
        raise ConfigError(f"unknown config key{'s' * (len(unknown) > 1)}: {', '.join(unknown)}")
    obj: T = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if validate is not None:
        validate(obj)
    return obj


def save_config(cfg: DictConfig, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Create ``out_dir`` and write the resolved config into it (the run's record of what it did)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / name, resolve=True)
    return out / name
