"""``longattn-train`` / ``python -m train``: stage 2 as a Hydra app (primary config ``conf/train.yaml``)."""

from __future__ import annotations

import copy
import logging
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from longattn.common.hydra_app import CONF_DIR, save_config, to_dataclass
from train.config import TrainRunConfig, derive, register_configs, validate_static

log = logging.getLogger("train")
register_configs()


def to_schema(cfg: DictConfig) -> TrainRunConfig:
    return to_dataclass(TrainRunConfig, cfg, validate_static)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from train.launch import LAUNCHERS

    run_cfg = to_schema(cfg)
    if "WORLD_SIZE" not in os.environ:  # check the parallel layout before starting any process
        derive(copy.deepcopy(run_cfg), run_cfg.launcher.nodes * run_cfg.launcher.nproc_per_node)
    if LAUNCHERS[run_cfg.launcher.name](run_cfg, list(HydraConfig.get().overrides.task)):
        return  # handed to torchrun or SLURM
    if int(os.environ.get("RANK", 0)) == 0:
        save_config(cfg, run_cfg.out_dir)
    from train.loop import run_train

    run_train(run_cfg)


if __name__ == "__main__":
    main()
