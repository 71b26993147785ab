"""``longattn-select``: the selection stage as a Hydra app (primary config ``conf/select.yaml``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from longattn.common.hydra_app import CONF_DIR, save_config, to_dataclass
from longattn.selection.config import SelectRunConfig, register_configs, validate

register_configs()


def to_schema(cfg: DictConfig) -> SelectRunConfig:
    return to_dataclass(SelectRunConfig, cfg, validate)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="select")
def main(cfg: DictConfig) -> None:
    from longattn.selection.run import run_select
    from longattn.selection.summary import print_summary

    run_cfg = to_schema(cfg)
    # config.yaml is written once out_dir is locked and its fingerprints checked: a refused rerun keeps it.
    result = run_select(run_cfg, on_checked=lambda: save_config(cfg, run_cfg.out_dir))
    if result.metrics is not None:
        print_summary(result)


if __name__ == "__main__":
    main()
