"""``longattn-train`` / ``python -m train``: stage 2 as a Hydra app (primary config ``conf/train.yaml``)."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from train.config import TrainRunConfig, derive, register_configs, validate_static

log = logging.getLogger("train")
register_configs()
# An absolute path: the entry point must find conf/ from any working directory.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def to_schema(cfg: DictConfig) -> TrainRunConfig:
    """Merge the composed YAML into the typed schema (type errors name the key) and validate it."""
    merged = OmegaConf.merge(OmegaConf.structured(TrainRunConfig), cfg)
    run_cfg: TrainRunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_static(run_cfg)
    return run_cfg


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from train.launch import LAUNCHERS

    run_cfg = to_schema(cfg)
    if "WORLD_SIZE" not in os.environ:  # check the parallel layout before starting any process
        derive(copy.deepcopy(run_cfg), run_cfg.launcher.nodes * run_cfg.launcher.nproc_per_node)
    if LAUNCHERS[run_cfg.launcher.name](run_cfg, list(HydraConfig.get().overrides.task)):
        return  # handed to torchrun or SLURM
    if int(os.environ.get("RANK", 0)) == 0:
        Path(run_cfg.out_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, Path(run_cfg.out_dir) / "config.yaml", resolve=True)
    from train.loop import run_train

    run_train(run_cfg)


if __name__ == "__main__":
    main()
