"""The prepared-data cache is keyed by what made it; offline a cold cache names what is missing and the
command that fetches it; the samsum stop rule reaches the backend; the backend gets room for every prompt."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from hydra import compose, initialize_config_dir

pytest.importorskip("lm_eval")

from eval.config import register_configs, to_schema  # noqa: E402
from eval.prepare import LeafTask, prepare  # noqa: E402
from eval.run import backend_max_length, prepare_key, prepare_once  # noqa: E402
from eval.sources import MissingDataError  # noqa: E402

DATA = ROOT / "tests" / "data" / "eval"
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_schema(compose("eval", overrides=list(overrides)))


def _data_file(task_dir: Path, leaf: str) -> Path:
    return Path(yaml.safe_load((task_dir / f"{leaf}.yaml").read_text())["dataset_kwargs"]["data_files"]["test"])


def test_ruler_cache_and_marker_follow_the_haystack(tokenizer_dir, tmp_path):
    """Another haystack (same path, new content) makes new essay samples and a new prepared marker; the
    tasks that do not read it are reused."""
    hay = tmp_path / "haystack.txt"
    shutil.copy(DATA / "haystack.txt", hay)
    args = [f"model.path={tokenizer_dir}", "eval.prepare_only=true", "suite=ruler", "eval.tasks=[niah_single_2,fwe]",
            "eval.lengths=[512]", "suite.ruler.num_samples=2", f"eval.cache_dir={tmp_path / 'c'}",
            f"suite.ruler.haystack={hay}"]
    out = tmp_path / "out"
    run = _compose(*args)
    key = prepare_key(run)
    prepare_once(run, out)
    essay, fwe = _data_file(out / "tasks", "longattn_ruler_niah_single_2_512"), _data_file(out / "tasks", "longattn_ruler_fwe_512")
    stamps = [essay.stat().st_mtime_ns, fwe.stat().st_mtime_ns]
    side = json.loads(Path(f"{essay}.json").read_text())
    assert side["key"]["source"]["sha256"] and side["key"]["sentence_split"] in ("punkt", "punctuation")

    assert prepare_key(_compose(*args)) == key
    prepare(_compose(*args), tmp_path / "tasks2")  # same sources: reused, not generated again
    assert [essay.stat().st_mtime_ns, fwe.stat().st_mtime_ns] == stamps

    hay.write_text("Lighthouses guide ships at night. " + hay.read_text(), encoding="utf-8")
    assert prepare_key(_compose(*args)) != key  # the marker of prepare_once is keyed by the source's content
    prepare_once(_compose(*args), out)
    essay2 = _data_file(out / "tasks", "longattn_ruler_niah_single_2_512")
    assert essay2 != essay and essay2.exists() and "Lighthouses" in essay2.read_text()
    assert _data_file(out / "tasks", "longattn_ruler_fwe_512") == fwe and fwe.stat().st_mtime_ns == stamps[1]


def test_longbench_cache_follows_the_source_file_and_budget(tokenizer_dir, tmp_path):
    data = tmp_path / "lb"
    data.mkdir()
    shutil.copy(DATA / "longbench" / "trec.jsonl", data / "trec.jsonl")
    args = [f"model.path={tokenizer_dir}", "eval.prepare_only=true", "suite=longbench", "eval.tasks=[trec]",
            "model.max_length=1000", "suite.longbench.max_prompt_tokens=300", f"eval.cache_dir={tmp_path / 'c'}",
            f"suite.longbench.data_dir={data}"]
    first = _data_file(tmp_path / "t", prepare(_compose(*args), tmp_path / "t")[0].name)
    assert _data_file(tmp_path / "t", prepare(_compose(*args), tmp_path / "t")[0].name) == first
    record = json.loads((data / "trec.jsonl").read_text())
    (data / "trec.jsonl").write_text(json.dumps({**record, "input": "What is the capital of Chile?"}) + "\n")
    second = _data_file(tmp_path / "t", prepare(_compose(*args), tmp_path / "t")[0].name)
    assert second != first and "Chile" in json.loads(second.read_text())["prompt"]
    third = _data_file(tmp_path / "t", prepare(_compose(*args[:-3], "suite.longbench.max_prompt_tokens=200",
                                                         *args[-2:]), tmp_path / "t")[0].name)
    assert third not in (first, second)


def test_fixture_data_never_reaches_the_default_cache(tokenizer_dir, tmp_path_factory):
    """Tests (and the stages they launch) resolve eval.cache_dir's default to a session directory, never to
    the user's cache; the pipeline's tiny experiment leaves the default alone, so it lands there too."""
    default = Path(_compose(f"model.path={tokenizer_dir}", "eval.prepare_only=true").eval.cache_dir)
    assert default == Path(os.environ["LONGATTN_EVAL_CACHE"])
    assert default.is_relative_to(tmp_path_factory.getbasetemp()) and not default.is_relative_to(Path.home() / ".cache")
    repro = yaml.safe_load((ROOT / "conf" / "experiment" / "repro_tiny.yaml").read_text())
    assert "eval.cache_dir" not in repro["eval"]["overrides"]
    run = _compose(f"model.path={tokenizer_dir}", "eval.prepare_only=true", "suite=ruler", "eval.tasks=[fwe]",
                   "eval.lengths=[256]", "suite.ruler.num_samples=1")
    prepare(run, tmp_path_factory.mktemp("tasks"))
    assert list(default.glob("ruler/*/256/fwe.*.jsonl"))


@pytest.mark.parametrize("suite, task, names", [
    ("ruler", "niah_single_2", ["Paul Graham essays", "suite.ruler.haystack"]),
    ("ruler", "qa_1", ["SQuAD", "dev-v2.0.json", "suite.ruler.squad"]),
    ("ruler", "qa_2", ["HotpotQA", "suite.ruler.hotpotqa"]),
    ("longbench", "trec", ["LongBench data", "THUDM/LongBench", "suite.longbench.data_dir"]),
    ("short", "humaneval", ["HumanEval", "openai/openai_humaneval", "suite.short.data_dir"]),
])
def test_cold_cache_offline_names_what_is_missing(tokenizer_dir, tmp_path, monkeypatch, suite, task, names):
    import datasets.config
    import huggingface_hub.constants

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # as an offline job sets them (read at import)
        monkeypatch.setenv(k, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # cold caches too
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    budget = ["model.max_length=1000", "suite.longbench.max_prompt_tokens=300"] if suite == "longbench" else []
    run = _compose(f"model.path={tokenizer_dir}", f"suite={suite}", f"eval.tasks=[{task}]", "eval.lengths=[1024]",
                   *budget, f"eval.cache_dir={tmp_path / 'c'}", "eval.prepare_only=true")
    with pytest.raises(MissingDataError) as e:
        prepare(run, tmp_path / "tasks")
    message = str(e.value)
    for name in [*names, f"longattn-eval eval.prepare_only=true suite=[{suite}] model.path={tokenizer_dir}",
                 f"eval.cache_dir={tmp_path / 'c'}"]:
        assert name in message, (name, message)


def test_hub_task_errors_name_the_prepare_command():
    from eval.harness import hub_errors

    with pytest.raises(MissingDataError, match=r"\['hellaswag'\].*\n  longattn-eval eval.prepare_only=true"):
        with hub_errors(["hellaswag"], "longattn-eval eval.prepare_only=true suite=[short]"):
            raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled)")
    with pytest.raises(ValueError):  # not a fetch error: left alone
        with hub_errors(["hellaswag"], "cmd"):
            raise ValueError("a bug")


def test_backend_room_covers_every_prompt_whatever_the_suite(tokenizer_dir):
    run = _compose(f"model.path={tokenizer_dir}", "suite=longbench", "model.max_length=1000",
                   "suite.longbench.max_prompt_tokens=300", "eval.prepare_only=true")
    lb = LeafTask("lb", "longbench", "gov_report", "all", "score", 1.0, max_tokens=302, max_gen_toks=512)
    assert backend_max_length(run, [lb]) == 1000  # fits: the model's own length
    ruler = LeafTask("r", "ruler", "fwe", "1024", "score", 1.0, max_tokens=1025, max_gen_toks=50)
    mc = LeafTask("m", "short", "mmlu", "all", "acc", 100.0)
    assert backend_max_length(run, [lb, ruler, mc]) == 1075


def _newline_loving_model(tokenizer, path: Path, ranks: dict[int, float]) -> Path:
    """A LLaMA whose next token never depends on the input: logits = ``ranks`` (all others 0). Attention and
    MLP write nothing, the embedding is one constant direction, so the final hidden state is too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.model.norm.weight.fill_(1.0)
        for tok, logit in ranks.items():
            model.lm_head.weight[tok, 0] = logit
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_samsum_stops_on_the_newline_token_after_one_token(tokenizer_dir, tmp_path):
    """The reference's samsum rule through lm-eval's HF backend: the newline (the likeliest token) cannot come
    first, then ends the generation; a text stop on "\\n" would return nothing."""
    from dataclasses import replace

    from lm_eval.api.instance import Instance
    from transformers import AutoTokenizer

    from eval.harness import build_lm
    from eval.prepare import greedy, samsum_stop

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    newline, word = tok.encode("\n", add_special_tokens=False)[-1], tok.encode("the", add_special_tokens=False)[0]
    model = _newline_loving_model(tok, tmp_path / "m", {newline: 3.0, word: 2.0, tok.eos_token_id: 1.5})
    run = _compose(f"model.path={model}", "suite=longbench", "model.dtype=float32", "model.max_length=1000",
                   "suite.longbench.max_prompt_tokens=300", "eval.device=cpu")
    lm = build_lm(replace(run.model, max_length=1000), run.eval)

    def generate(kwargs: dict) -> str:
        req = Instance("generate_until", doc={}, arguments=("Dialogue: hi\nSummary: ", kwargs), idx=0)
        return lm.generate_until([req])[0]

    assert generate(greedy(8, **samsum_stop(tok, "hf"))) == tok.decode([word]) + "\n"
    assert generate(greedy(8, until=["\n"])) == ""
    assert samsum_stop(tok, "vllm") == {"stop_token_ids": [newline], "min_tokens": 1}


def test_each_ruler_length_is_its_own_lm_eval_task(tokenizer_dir, tmp_path):
    """So eval.limit applies to every length (lm-eval's ruler group takes the limit from the first only)."""
    run = _compose(f"model.path={tokenizer_dir}", "eval.prepare_only=true", "suite=ruler", "eval.tasks=[fwe]",
                   "eval.lengths=[256,512]", "suite.ruler.num_samples=1", f"eval.cache_dir={tmp_path / 'c'}")
    leaves = prepare(run, tmp_path / "tasks")
    assert [(leaf.name, leaf.key, leaf.max_gen_toks) for leaf in leaves] == [
        ("longattn_ruler_fwe_256", "256", 50), ("longattn_ruler_fwe_512", "512", 50)]
    spec = yaml.safe_load((tmp_path / "tasks" / "longattn_ruler_fwe_512.yaml").read_text())
    assert spec["include"].endswith("ruler.yaml") and spec["generation_kwargs"]["max_gen_toks"] == 50
    assert json.loads(_data_file(tmp_path / "tasks", "longattn_ruler_fwe_512").read_text())["max_length"] == 512
