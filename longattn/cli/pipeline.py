"""``longattn-pipeline``: one experiment point (select -> train -> eval) as a Hydra app (``conf/pipeline.yaml``).

``-m`` sweeps points; each paper table is one experiment whose grid sits in ``hydra.sweeper.params``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from longattn.common.hydra_app import CONF_DIR, save_config, to_dataclass
from longattn.experiments.pipeline import PipelineConfig, excluded, register_configs, run_point

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
def main(cfg: DictConfig) -> None:
    run_cfg = to_dataclass(PipelineConfig, cfg)
    if (cell := excluded(run_cfg)) is not None:
        print(f"{run_cfg.name}: not a cell of this experiment's table ({cell}): skipped")
        return
    save_config(cfg, Path(run_cfg.root) / "points", f"{run_cfg.name}.yaml")
    for step in run_point(run_cfg):
        print(f"{step['stage']:<7} {'done' if step['done'] else 'planned':<8} {step['out_dir']}")


if __name__ == "__main__":
    main()
