"""What each suite contains: task names, how their data is made, their metric and the paper's groupings.

Plain data, no I/O. Task names are the reference benchmarks' (RULER ``qa_1`` = SQuAD, ``qa_2`` = HotpotQA;
LongBench's dataset names); the lm-eval name each one comes from is kept next to it.
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


_LB = [
    ("narrativeqa", "qa_f1", "single_doc_qa"), ("qasper", "qa_f1", "single_doc_qa"),
    ("multifieldqa_en", "qa_f1", "single_doc_qa"), ("multifieldqa_zh", "qa_f1_zh", "single_doc_qa"),
    ("hotpotqa", "qa_f1", "multi_doc_qa"), ("2wikimqa", "qa_f1", "multi_doc_qa"),
    ("musique", "qa_f1", "multi_doc_qa"), ("dureader", "rouge_zh", "multi_doc_qa"),
    ("gov_report", "rouge", "summarization"), ("qmsum", "rouge", "summarization"),
    ("multi_news", "rouge", "summarization"), ("vcsum", "rouge_zh", "summarization"),
    ("trec", "classification", "few_shot"), ("triviaqa", "qa_f1", "few_shot"),
    ("samsum", "rouge", "few_shot"), ("lsht", "classification", "few_shot"),
    ("passage_count", "count", "synthetic"), ("passage_retrieval_en", "retrieval", "synthetic"),
    ("passage_retrieval_zh", "retrieval_zh", "synthetic"),
    ("lcc", "code_sim", "code"), ("repobench-p", "code_sim", "code"),
]
LONGBENCH_TASKS: dict[str, LongBenchTask] = {n: LongBenchTask(n, m, c) for n, m, c in _LB}
LONGBENCH_CATEGORIES: dict[str, list[str]] = {}
for _t in LONGBENCH_TASKS.values():
    LONGBENCH_CATEGORIES.setdefault(_t.category, []).append(_t.name)

# Short-context suites (Table 2): lm-eval task names; HumanEval is scored by the project (pass@1).
SHORT_TASKS = ["mmlu", "hellaswag", "humaneval", "openbookqa"]
# The metric each one reports in Table 2.
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
