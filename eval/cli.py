"""``longattn-eval``: the evaluation stage as a Hydra app (primary config ``conf/eval.yaml``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from eval.config import register_configs, to_schema

log = logging.getLogger("eval.cli")
register_configs()
# An absolute path: the entry point must find conf/ from any working directory.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from eval.run import run_eval

    run_cfg = to_schema(cfg)
    Path(run_cfg.out_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(run_cfg.out_dir) / "config.yaml", resolve=True)
    doc = run_eval(run_cfg)
    if doc is not None:
        print(json.dumps({k: v for k, v in doc.items() if k != "meta"}, indent=1))


if __name__ == "__main__":
    main()
