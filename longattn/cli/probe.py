"""``longattn-probe``: the selection-quality probe as a Hydra app (primary config ``conf/probe.yaml``).

Scores a labelled corpus (genuine long documents vs concatenations of short texts) and prints AUROC per
category; ``-m scorer=longattn,prolong,random`` compares scorers.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from longattn.common.hydra_app import CONF_DIR, save_config, to_dataclass
from longattn.selection.probe import (
    ProbeRunConfig,
    best_setting,
    markdown_table,
    register_configs,
    run_probe,
    validate,
)

register_configs()


def to_schema(cfg: DictConfig) -> ProbeRunConfig:
    return to_dataclass(ProbeRunConfig, cfg, validate)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="probe")
def main(cfg: DictConfig) -> None:
    run_cfg = to_schema(cfg)
    res = run_probe(run_cfg, on_checked=lambda: save_config(cfg, run_cfg.out_dir))
    print(f"\nAUROC (label 1 = genuine long document) — {run_cfg.out_dir}\n")
    print(markdown_table([res]))
    print("\n" + best_setting([res]))


if __name__ == "__main__":
    main()
