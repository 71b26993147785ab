"""What every stage's Hydra entry point shares: where ``conf/`` is, and YAML -> validated dataclass."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")

# An absolute path: entry points must find conf/ from any working directory (and from installed scripts).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def to_dataclass(schema: type[T], cfg: DictConfig, validate: Callable[[T], Any] | None = None) -> T:
    """Merge the composed YAML into the typed schema (type errors name the key), then validate it."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
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
