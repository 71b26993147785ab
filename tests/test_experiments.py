"""Every experiment config composes into the points of its paper table, and a point plans its stages."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from longattn.common.hydra_app import CONF_DIR, to_dataclass
from longattn.experiments.pipeline import PipelineConfig, _value, excluded, plan_point
from longattn.experiments.pipeline import register_configs as register_pipeline

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
PIPELINE = [n for n in EXPERIMENTS if not n.startswith("train_")]
PATHS = ["paths.llama31_8b=/m/8b", "paths.llama31_70b=/m/70b", "paths.llama3_8b=/m/base", "paths.opt_350m=/m/opt"]

# The cells of each paper table: (method, training tokens in B, alpha).
METHODS = ["random", "prolong", "longattn8", "longattn70"]
PAPER_CELLS = {
    "data_scale": {("random", t, 0.5) for t in (1, 3, 5, 10, 20)}
    | {(m, t, 0.5) for m in METHODS[1:] for t in (1, 3, 5, 10)},
    "fixed_scale": {(m, 5, 0.5) for m in METHODS},
    "ablation_alpha": {("longattn8", t, a) for t in (3, 5) for a in (0.5, 1.0, 0.0)},
    "cost": {(m, 5, 0.5) for m in METHODS[1:]},
    "ds_var_stats": {("longattn70", 5, 0.5)},
    "repro_tiny": {(m, 2.56e-6, 0.5) for m in ("random", "prolong_smollm2", "longattn_smollm2")},
    "demo": {(m, 1.024e-5, 0.5) for m in ("random", "prolong_smollm2", "longattn_smollm2")},  # make demo
}


def _compose(config_name: str, overrides: list[str], hydra_cfg: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_cfg)


def grid(name: str) -> list[list[str]]:
    """The override lists of the experiment's sweep (hydra.sweeper.params), one per point."""
    register_pipeline()
    params = _compose("pipeline", [f"+experiment={name}"], hydra_cfg=True).hydra.sweeper.params or {}
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(p) for p in itertools.product(*axes)]


def test_every_pipeline_experiment_is_a_paper_table():
    assert set(PIPELINE) == set(PAPER_CELLS)


@pytest.mark.parametrize("name", PIPELINE)
def test_sweep_grid_is_the_paper_table(name):
    cells = set()
    for point in grid(name):
        cfg = to_dataclass(PipelineConfig, _compose("pipeline", [f"+experiment={name}", *point, *PATHS]))
        if excluded(cfg) is None:
            cells.add((cfg.method, float(cfg.tokens) / 1e9, float(cfg.alpha)))
            assert cfg.tags.get("table") and cfg.name.startswith(name.split("_")[0])
    assert cells == {(m, float(t), a) for m, t, a in PAPER_CELLS[name]}


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n.startswith("train_")])
def test_train_experiments_validate(name):
    from train.config import TrainRunConfig, register_configs, validate_static

    register_configs()
    base = [f"+experiment={name}", "data.selected=/s", "model.path=/m", "out_dir=/o"]
    cfg = to_dataclass(TrainRunConfig, _compose("train", base))
    if not (cfg.train.tokens or cfg.train.steps):  # the paper run takes its budget from the point (D_Ax)
        cfg = to_dataclass(TrainRunConfig, _compose("train", [*base, "train.tokens=5e9"]))
    validate_static(cfg)  # raises ConfigError naming a key if the experiment cannot run as written


@pytest.mark.parametrize("name", PIPELINE)
def test_pipeline_point_plans_all_stages(name, tmp_path):
    register_pipeline()
    cfg = _compose("pipeline", [f"+experiment={name}", "data=[raw.jsonl]", f"root={tmp_path}", *PATHS])
    point = to_dataclass(PipelineConfig, cfg)
    steps = plan_point(point)
    stages = [s["stage"] for s in steps]
    assert stages[0] == "select"
    assert all(not s["done"] for s in steps)
    sel = steps[0]["overrides"]
    assert "data.paths=[raw.jsonl]" in sel
    if "train" in stages:
        train = steps[stages.index("train")]["overrides"]
        assert f"data.selected={steps[0]['out_dir']}" in train
        # Table 7: 30 % of the training tokens per long category (the tiny repro trains by steps instead)
        tokens = next(o for o in train if o.startswith("train.tokens=")).split("=")[1]
        assert f"select.tokens={float(point.tokens) * 0.3}" in sel
        assert tokens == "null" or float(tokens) == point.tokens
    if "eval" in stages:
        ev = steps[stages.index("eval")]["overrides"]
        assert f"model.path={steps[stages.index('train')]['out_dir']}/hf" in ev


def test_points_share_a_selection(tmp_path):
    """Two training budgets on the same selection budget reuse one select stage dir (content addressing)."""
    register_pipeline()
    base = ["+experiment=data_scale", "method=random", "data=[raw.jsonl]", f"root={tmp_path}"]
    a = plan_point(to_dataclass(PipelineConfig, _compose("pipeline", [*base, "tokens=5e9"])))
    b = plan_point(to_dataclass(PipelineConfig, _compose("pipeline", [*base, "tokens=5e9", "alpha=0.5"])))
    c = plan_point(to_dataclass(PipelineConfig, _compose("pipeline", [*base, "tokens=3e9"])))
    assert a[0]["out_dir"] == b[0]["out_dir"] != c[0]["out_dir"]
    assert a[1]["out_dir"] != c[1]["out_dir"]


@pytest.mark.parametrize("value", ["plain", "a b", "x,y", "[1]", "k=v", "it's", 'say "hi"', "a\\b", "", "{x}",
                                   "path/with:colon", 3, 2.5e9, True, None, [1, "a b"], {"k": "v w"}])
def test_override_values_survive_hydras_parser(value):
    parsed = OverridesParser.create().parse_override(f"key={_value(value)}")
    got = parsed.value()
    expect = value if not isinstance(value, float) else float(value)
    assert (float(got) if isinstance(value, float) else got) == expect


def test_one_command_runs_the_whole_table_grid(tmp_path):
    """`-m +experiment=data_scale` alone runs Table 1's 17 points and skips the 3 cells the paper lacks."""
    proc = subprocess.run([sys.executable, "-m", "longattn.cli.pipeline", "-m", "+experiment=data_scale",
                           "data=[raw.jsonl]", f"root={tmp_path}", "dry_run=true", *PATHS],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [ln for ln in proc.stdout.splitlines() if ln.endswith("skipped")]
    planned = [ln for ln in proc.stdout.splitlines() if ln.startswith("select ")]
    assert len(skipped) == 3 and all("20B" in ln for ln in skipped)
    assert len(planned) == 17
