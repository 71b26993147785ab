"""``longattn-eval`` configuration: composition, validation errors that name the key, few-shot groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

pytest.importorskip("lm_eval")

from eval.config import ConfigError, register_configs, to_schema  # noqa: E402

DATA = ROOT / "tests" / "data" / "eval"
register_configs()


def model_dir(path: Path, weights: bool = True, tokenizer: bool = True) -> Path:
    """The files validation looks for in an HF model directory (nothing here loads them)."""
    path.mkdir(parents=True, exist_ok=True)
    if weights:
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_schema(compose("eval", overrides=list(overrides)))


@pytest.fixture()
def model(tmp_path) -> Path:
    return model_dir(tmp_path / "model")


def test_config_composes_suites(model):
    run = _compose(f"model.path={model}", "suite=[ruler,longbench,short]")
    assert set(run.suite) == {"ruler", "longbench", "short"}
    assert run.eval.lengths == [32768] and run.suite["short"].num_fewshot == {}  # lm-eval's defaults: 0-shot
    assert run.suite["longbench"].max_prompt_tokens == 31500  # the reference's budget for its 32k models
    assert list(_compose(f"model.path={model}", "suite=longbench").suite) == ["longbench"]


@pytest.mark.parametrize("override, key", [
    ("eval.tasks=[niah_single_9]", "eval.tasks"),
    ("eval.backend=vllm", "eval.backend=vllm"),
    ("eval.lengths=[512]", "eval.lengths"),
    ("eval.limit=0", "eval.limit"),
    ("suite.ruler.haystack=/nonexistent.txt", "suite.ruler.haystack"),
    ("eval.tasks=[mmlu]", "eval.tasks"),
])
def test_config_errors_name_the_key(model, override, key):
    if override == "eval.backend=vllm" and __import__("importlib").util.find_spec("vllm"):
        pytest.skip("vllm is installed")
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        _compose(f"model.path={model}", override)


def test_lm_eval_task_names_map_to_reference_names(model):
    run = _compose(f"model.path={model}", "suite=[ruler,longbench]",
                   "eval.tasks=[ruler_qa_squad,ruler_vt,niah_single_1,longbench_trec]")
    assert run.eval.tasks == ["qa_1", "vt", "niah_single_1", "trec"]


def test_few_shot_groups(model):
    from eval.prepare import LeafTask
    from eval.run import _shot_groups

    run = _compose(f"model.path={model}", "suite=[ruler,short]", "+suite.short.num_fewshot.mmlu=5")
    leaves = [LeafTask("mmlu", "short", "mmlu", "all", "acc", 100.0), LeafTask("h", "short", "humaneval", "all", "pass@1"),
              LeafTask("r", "ruler", "vt", "32768", "score")]
    groups = _shot_groups(run, leaves)
    assert [leaf.name for leaf in groups[5]] == ["mmlu"] and [leaf.name for leaf in groups[None]] == ["h", "r"]


def test_missing_model_dir_names_key():
    with pytest.raises(ConfigError, match="model.path"):
        _compose("model.path=/nonexistent/model")


@pytest.mark.parametrize("weights, tokenizer, message", [
    (False, False, "no config.json"),        # an empty directory
    (False, True, "no config.json"),         # a tokenizer directory given as the model
    (True, False, "no tokenizer files"),     # weights without a tokenizer
])
def test_non_model_dir_fails_in_validation(tmp_path, weights, tokenizer, message):
    d = model_dir(tmp_path / "m", weights=weights, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match=f"model.path={d}.*{message}"):
        _compose(f"model.path={d}", "suite=ruler")


def test_weights_only_dir_and_separate_tokenizer(tmp_path):
    d, tok = model_dir(tmp_path / "m", tokenizer=False), model_dir(tmp_path / "tok", weights=False)
    assert _compose(f"model.path={d}", f"model.tokenizer={tok}").model.tokenizer == str(tok)
    with pytest.raises(ConfigError, match="model.tokenizer="):
        _compose(f"model.path={d}", f"model.tokenizer={tmp_path / 'm'}")
    # prepare_only needs the tokenizer only (a login node may hold no weights)
    assert _compose(f"model.path={tok}", "eval.prepare_only=true").eval.prepare_only


def test_vllm_data_parallel_needs_ray(model, monkeypatch):
    import importlib.util

    import eval.config as C

    real = importlib.util.find_spec
    monkeypatch.setattr(C.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else None if name == "ray" else real(name, *a))
    assert _compose(f"model.path={model}", "eval.backend=vllm").eval.backend == "vllm"
    with pytest.raises(ConfigError, match=r"eval.data_parallel_size=8 .*needs ray"):
        _compose(f"model.path={model}", "eval.backend=vllm", "eval.data_parallel_size=8")


def test_longbench_budget_and_data_dir_checked(model, tmp_path):
    with pytest.raises(ConfigError, match="suite.longbench.max_prompt_tokens=31500 .*model.max_length=8192"):
        _compose(f"model.path={model}", "suite=longbench", "model.max_length=8192")
    assert _compose(f"model.path={model}", "suite=longbench", "model.max_length=8192",
                    "suite.longbench.max_prompt_tokens=7500").model.max_length == 8192
    (tmp_path / "lb").mkdir()
    (tmp_path / "lb" / "trec.jsonl").write_text(json.dumps({"input": "", "context": "", "answers": ["x"]}) + "\n")
    with pytest.raises(ConfigError, match="suite.longbench.data_dir=.* has no narrativeqa.jsonl"):
        _compose(f"model.path={model}", "suite=longbench", f"suite.longbench.data_dir={tmp_path / 'lb'}")
    assert _compose(f"model.path={model}", "suite=longbench", f"suite.longbench.data_dir={tmp_path / 'lb'}",
                    "eval.tasks=[trec]").eval.tasks == ["trec"]


def test_humaneval_fixture_canonical_solutions_pass():
    from eval.tasks.hooks import humaneval_results

    for line in (DATA / "short" / "humaneval.jsonl").read_text().splitlines():
        doc = json.loads(line)
        assert humaneval_results(doc, [doc["canonical_solution"]]) == {"pass@1": 100.0}
        assert humaneval_results(doc, ["    return None\n"]) == {"pass@1": 0.0}
