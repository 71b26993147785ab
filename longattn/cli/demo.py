"""``longattn-demo`` (``make demo``): select with every method, probe, train, evaluate and print the tables.

A Hydra app (primary config ``conf/demo.yaml``); ``longattn.experiments.demo`` does the work.

    longattn-demo                                  # conf/experiment/demo.yaml, three methods, runs/demo
    longattn-demo jobs=1 root=runs/demo_serial     # one point at a time
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from longattn.common.hydra_app import CONF_DIR, save_config, to_dataclass
from longattn.experiments.demo import DemoConfig, register_configs, run_demo

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    run_cfg = to_dataclass(DemoConfig, cfg)
    os.environ.setdefault("WANDB_SILENT", "true")  # the demo prints its own progress; W&B's goes to the logs
    save_config(cfg, run_cfg.root, "demo.yaml")
    print(run_demo(run_cfg), flush=True)


if __name__ == "__main__":
    main()
