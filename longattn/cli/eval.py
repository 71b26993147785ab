"""``longattn-eval``: the evaluation stage as a Hydra app (primary config ``conf/eval.yaml``)."""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig

from eval.config import ConfigError, register_configs, to_schema
from longattn.common.hydra_app import CONF_DIR, save_config

log = logging.getLogger("longattn.cli.eval")
register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from eval.run import run_eval
    from eval.sources import MissingDataError

    run_cfg = to_schema(cfg)
    save_config(cfg, run_cfg.out_dir)
    try:
        doc = run_eval(run_cfg)
    except (MissingDataError, ConfigError) as e:  # what is missing or wrong, and what to do; no traceback
        sys.exit(f"error: {e}")
    if doc is not None:
        print(json.dumps({k: v for k, v in doc.items() if k != "meta"}, indent=1))


if __name__ == "__main__":
    main()
