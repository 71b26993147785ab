"""What each suite contains: task names, how their data is made, their metric and the paper's groupings.

Plain data, no I/O. Task names are the reference benchmarks' (RULER ``qa_1`` = SQuAD, ``qa_2`` = HotpotQA;
LongBench's dataset names); the lm-eval name each one comes from is kept next to it.

The RULER reference is NVIDIA/RULER at commit c5341b4 (2024-12-04), the version current when the paper was
written; lm-eval 0.4.13's port follows it (linear search of the haystack size, the ``assgined`` typo of the VT
answer prefix, no space between the CWE example's answer prefix and its answer). docs/eval.md lists what
RULER changed in 2025.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RulerTask:
    name: str
    """Reference RULER name (``niah_single_1``, ``vt``, ``qa_1``...)."""
    kind: str
    """Generator: ``niah``, ``vt``, ``cwe``, ``fwe`` or ``qa``."""
    metric: str
    """``string_match_all`` or ``string_match_part`` (eval/metrics.py)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Generator arguments (the reference RULER task configuration)."""
    max_gen_toks: int = 128
    """Tokens generated per sample (reference ``tokens_to_generate``)."""

    @property
    def needs_essays(self) -> bool:
        return self.params.get("type_haystack") == "essay"


def _niah(name: str, haystack: str, k: str, v: str, **extra: int) -> RulerTask:
    params = {"type_haystack": haystack, "type_needle_k": k, "type_needle_v": v, **extra}
    return RulerTask(name, "niah", "string_match_all", params)


RULER_TASKS: dict[str, RulerTask] = {t.name: t for t in [
    _niah("niah_single_1", "repeat", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", num_needle_k=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", num_needle_v=4),
    _niah("niah_multiquery", "essay", "words", "numbers", num_needle_q=4),
    RulerTask("vt", "vt", "string_match_all", {"num_chains": 1, "num_hops": 4}, max_gen_toks=30),
    RulerTask("cwe", "cwe", "string_match_all", {}, max_gen_toks=120),
    RulerTask("fwe", "fwe", "string_match_all", {}, max_gen_toks=50),
    RulerTask("qa_1", "qa", "string_match_part", {"dataset": "squad"}, max_gen_toks=32),
    RulerTask("qa_2", "qa", "string_match_part", {"dataset": "hotpotqa"}, max_gen_toks=32),
]}

# Answer prefixes of the reference (RULER scripts/data/synthetic/constants.py) that lm-eval does not keep as
# constants. The reference appends the prefix to the template before sizing a sample and sends
# ``input + answer_prefix`` to the model; VT, CWE and FWE prefixes are lm-eval's CONFIG (the same text).
RULER_NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
RULER_QA_ANSWER_PREFIX = " Answer:"

# lm-eval 0.4.13 names of the same tasks (for readers comparing with `lm_eval --tasks ruler`).
RULER_LM_EVAL_NAMES = {**{n: n for n in RULER_TASKS if n.startswith("niah")},
                       "vt": "ruler_vt", "cwe": "ruler_cwe", "fwe": "ruler_fwe",
                       "qa_1": "ruler_qa_squad", "qa_2": "ruler_qa_hotpot"}

# The paper's groupings (Table 1: the eight NIAH tasks averaged as "retrieval"; Table 11: all 13).
RULER_GROUPS: dict[str, list[str]] = {
    "retrieval": [n for n in RULER_TASKS if n.startswith("niah")],
    "vt": ["vt"],
    "aggregation": ["cwe", "fwe"],
    "qa": ["qa_1", "qa_2"],
    "all": list(RULER_TASKS),
}


@dataclass(frozen=True)
class LongBenchTask:
    name: str
    """Reference LongBench dataset name (lm-eval task ``longbench_<name>``)."""
    metric: str
    """Key of ``LONGBENCH_METRICS`` (eval/metrics.py)."""
    category: str
    """One of the six categories of the paper's Table 3."""
    language: str
    """``en``, ``zh`` or ``code`` (LongBench's README averages per language; code counts in both)."""


_LB = [
    ("narrativeqa", "qa_f1", "single_doc_qa", "en"), ("qasper", "qa_f1", "single_doc_qa", "en"),
    ("multifieldqa_en", "qa_f1", "single_doc_qa", "en"), ("multifieldqa_zh", "qa_f1_zh", "single_doc_qa", "zh"),
    ("hotpotqa", "qa_f1", "multi_doc_qa", "en"), ("2wikimqa", "qa_f1", "multi_doc_qa", "en"),
    ("musique", "qa_f1", "multi_doc_qa", "en"), ("dureader", "rouge_zh", "multi_doc_qa", "zh"),
    ("gov_report", "rouge", "summarization", "en"), ("qmsum", "rouge", "summarization", "en"),
    ("multi_news", "rouge", "summarization", "en"), ("vcsum", "rouge_zh", "summarization", "zh"),
    ("trec", "classification", "few_shot", "en"), ("triviaqa", "qa_f1", "few_shot", "en"),
    ("samsum", "rouge", "few_shot", "en"), ("lsht", "classification", "few_shot", "zh"),
    ("passage_count", "count", "synthetic", "en"), ("passage_retrieval_en", "retrieval", "synthetic", "en"),
    ("passage_retrieval_zh", "retrieval_zh", "synthetic", "zh"),
    ("lcc", "code_sim", "code", "code"), ("repobench-p", "code_sim", "code", "code"),
]
LONGBENCH_TASKS: dict[str, LongBenchTask] = {n: LongBenchTask(n, m, c, lang) for n, m, c, lang in _LB}
LONGBENCH_CATEGORIES: dict[str, list[str]] = {}
"""The paper's Table 3: six categories, English and Chinese tasks mixed."""
for _t in LONGBENCH_TASKS.values():
    LONGBENCH_CATEGORIES.setdefault(_t.category, []).append(_t.name)
LONGBENCH_CATEGORIES_BY_LANGUAGE: dict[str, dict[str, list[str]]] = {
    lang: {cat: [t for t in tasks if LONGBENCH_TASKS[t].language in (lang, "code")]
           for cat, tasks in LONGBENCH_CATEGORIES.items()}
    for lang in ("en", "zh")
}
"""LongBench's README leaderboard: per language, the same six categories (the two code tasks in both)."""
LONGBENCH_BUDGET_32K = 31500
"""The reference's truncation budget for its 32k models (LongBench ``config/model2maxlen.json``)."""

# Short-context suites (Table 2): lm-eval task names; HumanEval is scored by the project (pass@1).
SHORT_TASKS = ["mmlu", "hellaswag", "humaneval", "openbookqa"]
# The metric each one reports in Table 2 (docs/eval.md gives the source of each choice).
SHORT_METRICS = {"mmlu": "acc", "hellaswag": "acc_norm", "openbookqa": "acc_norm", "humaneval": "pass@1"}


def reference_name(name: str) -> str:
    """lm-eval's name of a task (``ruler_qa_squad``, ``longbench_trec``) as the reference's (``qa_1``, ``trec``)."""
    by_lm_eval = {v: k for k, v in RULER_LM_EVAL_NAMES.items()}
    if name in by_lm_eval:
        return by_lm_eval[name]
    if name.startswith("longbench_") and name[len("longbench_"):] in LONGBENCH_TASKS:
        return name[len("longbench_"):]
    return name


SUITES: dict[str, list[str]] = {
    "ruler": list(RULER_TASKS),
    "longbench": list(LONGBENCH_TASKS),
    "short": SHORT_TASKS,
}
