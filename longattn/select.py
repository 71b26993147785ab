"""``longattn-select``: the selection stage as a Hydra app (primary config ``conf/select.yaml``)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from longattn.config import SelectRunConfig, register_configs, validate

log = logging.getLogger("longattn.select")
register_configs()
# An absolute path: the entry point must find conf/ from any working directory.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def to_schema(cfg: DictConfig) -> SelectRunConfig:
    """Merge the composed YAML into the typed schema (type errors name the key) and validate it."""
    merged = OmegaConf.merge(OmegaConf.structured(SelectRunConfig), cfg)
    run_cfg: SelectRunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(run_cfg)
    return run_cfg


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="select")
def main(cfg: DictConfig) -> None:
    from longattn.pipeline import run_select
    from longattn.summary import print_summary

    run_cfg = to_schema(cfg)
    Path(run_cfg.out_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(run_cfg.out_dir) / "config.yaml", resolve=True)
    result = run_select(run_cfg)
    if result.metrics is not None:
        print_summary(result)


if __name__ == "__main__":
    main()
