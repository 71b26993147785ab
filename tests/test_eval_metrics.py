"""Reference RULER / LongBench scores, HumanEval execution and result grouping, on hand-computed values."""

from __future__ import annotations

import math

import pytest

from eval import metrics as M
from eval.humaneval import passes
from eval.results import (
    categories,
    collect,
    longbench_by_language,
    longbench_categories,
    ruler_groups,
    sample_rows,
)
from eval.suites import (
    LONGBENCH_CATEGORIES,
    LONGBENCH_CATEGORIES_BY_LANGUAGE,
    RULER_GROUPS,
    RULER_TASKS,
    SUITES,
)


def test_string_match_part_is_reference_max_over_refs():
    refs = ["the 10th century", "10th century", "10th"]
    assert M.string_match_part("10th century", refs) == 100.0
    # lm-eval 0.4.13's string_match_part, called per sample, is the mean over refs: 2 of 3 found.
    assert M.string_match_all("10th century", refs) == pytest.approx(200 / 3)
    assert M.string_match_part("the 11th", refs) == 0.0


def test_string_match_all_case_insensitive_mean():
    assert M.string_match_all("Numbers: 123 and 456", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert M.string_match_all("ABC-def", ["abc-DEF"]) == 100.0


def test_ruler_postprocess_control_chars():
    assert M.ruler_postprocess("  \x00 42\tfoo \n") == "42\nfoo"


def test_ruler_tasks_use_reference_metrics_and_names():
    assert len(RULER_TASKS) == 13 and len(RULER_GROUPS["retrieval"]) == 8
    assert {t.metric for t in RULER_TASKS.values() if t.kind == "qa"} == {"string_match_part"}
    assert RULER_TASKS["qa_1"].params["dataset"] == "squad" and RULER_TASKS["qa_2"].params["dataset"] == "hotpotqa"


def test_longbench_first_line_postprocessing():
    assert M.longbench_postprocess("trec", "\n\nCity\nType: Country") == "City"
    assert M.longbench_postprocess("narrativeqa", "\nMara\nand") == "\nMara\nand"
    # classification on the first line only: "Country" on line 2 no longer counts against "City"
    assert M.longbench_score("trec", "classification", "City\nCountry", ["City"], ["City", "Country"]) == 100.0
    assert M.longbench_score("narrativeqa", "qa_f1", "City\nCountry", ["City"]) == pytest.approx(100 * 2 / 3)


def test_qa_f1_hand_computed():
    # normalised: "cat sat on mat" vs "cat sat": precision 2/4, recall 1 -> F1 2/3
    assert M.qa_f1("The cat sat on the mat.", "a cat sat") == pytest.approx(2 / 3)
    assert M.qa_f1("dog", "cat") == 0.0
    # best answer wins, scaled to 0-100
    assert M.longbench_score("triviaqa", "qa_f1", "Paris", ["London", "paris"]) == 100.0


def test_classification_retrieval_count_code():
    assert M.classification("City or Country", "City", all_classes=["City", "Country"]) == 0.5
    # "Ci" is a substring of the true class: not counted against it
    assert M.classification("City", "City", all_classes=["City", "Ci"]) == 1.0
    assert M.retrieval("Paragraph 2, maybe 3", "Paragraph 2") == 0.5
    assert M.count("There are 2 or 2 or 5", 2) == pytest.approx(2 / 3)
    assert M.count("none", 2) == 0.0
    assert M.code_sim("```python\n    return a - b\n", "    return a - b") == 1.0


def test_classification_keeps_the_reference_iteration_quirk():
    """LongBench's classification_score removes substrings of the truth from the list it iterates over, so
    the class after each removal stays: "Ci" goes, "C" stays, and the score is 1/2, not 1."""
    assert M.classification("City", "City", all_classes=["Ci", "C", "City"]) == 0.5
    assert M.classification("City", "City", all_classes=["Ci", "City", "C"]) == 1.0


def test_rouge_and_zh():
    assert M.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0, abs=1e-6)
    assert M.rouge_l("", "the cat") == 0.0
    assert M.qa_f1_zh("北京是首都", "北京是首都。") == pytest.approx(1.0)


def test_middle_truncate_keeps_first_and_last_halves():
    head, tail = M.middle_truncate(list(range(10)), 4)
    assert head == [0, 1] and tail == [8, 9]
    assert M.middle_truncate([1, 2, 3], 4) == ([1, 2, 3], [])


def test_humaneval_pass_fail_timeout():
    prompt, test = "def f(x):\n", "def check(c):\n    assert c(2) == 4\n"
    assert passes(prompt, "    return x * 2\n", test, "f", timeout=10)
    assert not passes(prompt, "    return x + 3\n", test, "f", timeout=10)
    assert not passes(prompt, "    while True:\n        pass\n", test, "f", timeout=1)


def test_longbench_categories_table3():
    assert sum(map(len, LONGBENCH_CATEGORIES.values())) == 21 and len(LONGBENCH_CATEGORIES) == 6
    cats = longbench_categories({"narrativeqa": {"all": 10.0}, "qasper": {"all": 20.0}, "lcc": {"all": 60.0}})
    assert cats == {"single_doc_qa": 15.0, "code": 60.0, "avg": 37.5}


def test_longbench_categories_per_language_as_the_readme():
    """LongBench's README averages English and Chinese separately, the code tasks in both (its GPT-3.5 rows:
    code 54.1 in both tables = mean(54.7, 53.6)); the paper's Table 3 mixes them."""
    assert LONGBENCH_CATEGORIES_BY_LANGUAGE["zh"]["few_shot"] == ["lsht"]
    assert LONGBENCH_CATEGORIES_BY_LANGUAGE["en"]["synthetic"] == ["passage_count", "passage_retrieval_en"]
    lb = {"trec": {"all": 60.0}, "triviaqa": {"all": 80.0}, "lsht": {"all": 20.0}, "lcc": {"all": 54.7},
          "repobench-p": {"all": 53.6}}
    by_lang = longbench_by_language(lb)
    assert by_lang["en"]["few_shot"] == 70.0 and by_lang["zh"]["few_shot"] == 20.0
    assert by_lang["en"]["code"] == by_lang["zh"]["code"] == pytest.approx(54.15)
    assert by_lang["zh"]["avg"] == pytest.approx((20.0 + 54.15) / 2)
    assert longbench_categories(lb)["few_shot"] == pytest.approx(160 / 3)  # mixed, as Table 3
    assert "longbench_by_language" in categories({"longbench": lb})


def test_sample_rows_before_and_after_lm_evals_tracker():
    """Per-sample rows from lm-eval's records as returned, and after its tracker rewrote them for saving."""
    gen = _Leaf("longattn_ruler_vt_4096", "ruler", "vt", "4096", "score")
    gen.max_gen_toks = 30
    raw = {"doc_id": 0, "doc": {"outputs": ["AB"]}, "arguments": [("prompt text", {"until": []})],
           "filtered_resps": ["AB CD"], "score": 100.0, "target": "['AB']"}
    saved = {**raw, "arguments": {"gen_args_0": {"arg_0": "prompt text", "arg_1": {"until": []}}}}
    for s in (raw, saved):
        [row] = sample_rows(gen, [s])
        assert row == {"task": "vt", "column": "4096", "lm_eval_task": gen.name, "doc_id": 0, "prompt": "prompt text",
                       "prediction": "AB CD", "references": ["AB"], "score": 100.0}
    mc = _Leaf("longattn_hellaswag", "short", "hellaswag", "all", "acc_norm", 100.0)
    mc.max_gen_toks = 0
    s = {"doc_id": 3, "doc": {}, "target": "1", "acc_norm": 1.0, "filtered_resps": [["-2.5", "False"], ["-1.0", "True"]],
         "arguments": {"gen_args_0": {"arg_0": "ctx", "arg_1": " a"}, "gen_args_1": {"arg_0": "ctx", "arg_1": " b"}}}
    [row] = sample_rows(mc, [s])
    assert row["prediction"] == {"choices": [" a", " b"], "loglikelihoods": [-2.5, -1.0]}
    assert row["references"] == "1" and row["score"] == 100.0


def test_ruler_groups_per_length():
    ruler = {"niah_single_1": {"4096": 100.0, "32768": 50.0}, "niah_single_2": {"4096": 80.0},
             "cwe": {"4096": 10.0}, "fwe": {"4096": 30.0}}
    g = ruler_groups(ruler)
    assert g["retrieval"] == {"4096": 90.0, "32768": 50.0}
    assert g["aggregation"] == {"4096": 20.0}
    assert "qa" not in g


class _Leaf:
    def __init__(self, name, suite, task, key, metric, scale=1.0):
        self.name, self.suite, self.task, self.key, self.metric, self.scale = name, suite, task, key, metric, scale


def test_collect_weights_mmlu_subjects_by_size():
    leaves = [_Leaf("a", "short", "mmlu", "all", "acc", 100.0), _Leaf("b", "short", "mmlu", "all", "acc", 100.0),
              _Leaf("r", "ruler", "vt", "4096", "score")]
    res = {"results": {"a": {"acc,none": 1.0}, "b": {"acc,none": 0.0}, "r": {"score,none": 42.0}},
           "n-samples": {"a": {"effective": 3}, "b": {"effective": 1}, "r": {"effective": 5}}}
    out = collect(leaves, res)
    assert out == {"short": {"mmlu": {"all": 75.0}}, "ruler": {"vt": {"4096": 42.0}}}
    assert categories(out)["short"]["avg"] == 75.0
    assert math.isnan(M.mean([]))


def test_suites_sizes():
    assert len(SUITES["ruler"]) == 13 and len(SUITES["longbench"]) == 21 and len(SUITES["short"]) == 4


def test_task_hooks_restore_reference_semantics():
    """The hooks lm-eval calls (eval/tasks/hooks.py), against lm-eval 0.4.13's own RULER scorer."""
    hooks = pytest.importorskip("eval.tasks.hooks")
    doc = {"metric": "string_match_part", "outputs": ["the 10th century", "10th century", "10th"]}
    assert hooks.ruler_results(doc, [" 10th century\n"]) == {"score": 100.0}
    common = pytest.importorskip("lm_eval.tasks.ruler.common_utils")
    lm_eval_score = common.process_results_part({"max_length": 4096, "outputs": doc["outputs"]}, ["10th century"])
    assert lm_eval_score["4096"] == pytest.approx(2 / 3)  # mean over refs, 0-1: the difference pinned
    lb = {"task": "trec", "metric": "classification", "answers": ["City"], "all_classes": ["City", "Country"]}
    assert hooks.longbench_results(lb, ["\nCity\nCountry"]) == {"score": 100.0}
