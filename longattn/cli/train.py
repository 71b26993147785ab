"""``longattn-train`` / ``python -m train``: stage 2 as a Hydra app (primary config ``conf/train.yaml``)."""

from __future__ import annotations

import copy
import logging
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from longattn.common.distributed import env_rank
from longattn.common.hydra_app import CONF_DIR, save_config, to_dataclass
from train.config import (
    TrainRunConfig,
    data_dir,
    derive,
    launch_world_size,
    register_configs,
    validate_environment,
    validate_inputs,
    validate_static,
)

log = logging.getLogger("train")
register_configs()


def to_schema(cfg: DictConfig) -> TrainRunConfig:
    """The validated run config: values, the files they name, this machine (all before any side effect)."""
    run_cfg = to_dataclass(TrainRunConfig, cfg, validate_static)
    validate_inputs(run_cfg)
    validate_environment(run_cfg)
    if "WORLD_SIZE" not in os.environ:  # the parallel layout of the launch this process will start
        derive(copy.deepcopy(run_cfg), launch_world_size(run_cfg))
    return run_cfg


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from train.launch import LAUNCHERS
    from train.prepare import check_tokenizer, run_prepare

    run_cfg = to_schema(cfg)
    check_tokenizer(run_cfg)  # data.bos needs a BOS token: still before any side effect
    if LAUNCHERS[run_cfg.launcher.name](run_cfg, list(HydraConfig.get().overrides.task)):
        return  # handed to torchrun or SLURM
    if run_cfg.train.prepare_only:
        if run_cfg.data.prepare.rank == 0:
            save_config(cfg, data_dir(run_cfg), "prepare_config.yaml")
        run_prepare(run_cfg, launch_world_size(run_cfg))
        return
    if env_rank()[0] == 0:
        save_config(cfg, run_cfg.out_dir)
    from train.loop import run_train

    run_train(run_cfg)


if __name__ == "__main__":
    main()
