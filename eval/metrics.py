"""Scores of the reference benchmarks as pure functions (prediction and references in, a number out).

Every score is on 0-100, as the reference RULER and LongBench repositories report them. lm-eval's own
scorers differ in places (see each function); the task hooks in ``eval/tasks/hooks.py`` call these
instead. No lm-eval import here: the tests check them with hand-computed values.
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f]")


# ---------------------------------------------------------------- RULER


def ruler_postprocess(pred: str) -> str:
    """Control characters become newlines, then strip (as the reference RULER evaluation)."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def string_match_all(pred: str, refs: Sequence[str]) -> float:
    """Percentage of references found (case-insensitive substring) in the prediction.

    Used by the needle, VT, CWE and FWE tasks; same as lm-eval's ``string_match_all`` but on 0-100."""
    p = pred.lower()
    return 100.0 * sum(r.lower() in p for r in refs) / len(refs)


def string_match_part(pred: str, refs: Sequence[str]) -> float:
    """100 if any reference is in the prediction, else 0 (the reference RULER QA metric).

    lm-eval 0.4.13 computes ``max`` over samples of the *fraction* of references found, and since it is
    called per sample that is the mean over references: refs ["the 10th century", "10th century", "10th"]
    with prediction "10th century" score 66.7 there and 100 here."""
    p = pred.lower()
    return 100.0 if any(r.lower() in p for r in refs) else 0.0


RULER_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


# ---------------------------------------------------------------- LongBench

# Few-shot tasks whose answers are one line: the reference keeps the prediction's first line.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
_ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def longbench_postprocess(task: str, pred: str) -> str:
    """The reference's per-task post-processing: first non-leading line for the few-shot tasks."""
    if task in FIRST_LINE_TASKS:
        return pred.lstrip("\n").split("\n")[0]
    return pred


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalisation: lower case, no ASCII or Chinese punctuation, no whitespace."""
    punct = set(string.punctuation + _ZH_PUNCT)
    return "".join(ch for ch in s.lower() if ch not in punct and not ch.isspace())


def token_f1(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (0-1)."""
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(pred: str, ref: str, **_) -> float:
    return token_f1(normalize_answer(pred).split(), normalize_answer(ref).split())


def _zh_words(s: str) -> list[str]:
    try:
        import jieba  # the reference segments Chinese with jieba (lm-eval's longbench extra)
    except ImportError:
        log.warning("jieba is not installed: Chinese LongBench tasks fall back to characters")
        return list(s)
    return list(jieba.cut(s, cut_all=False))


def qa_f1_zh(pred: str, ref: str, **_) -> float:
    p = [w for w in (normalize_zh_answer(t) for t in _zh_words(pred)) if w]
    r = [w for w in (normalize_zh_answer(t) for t in _zh_words(ref)) if w]
    return token_f1(p, r)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str, **_) -> float:
    """ROUGE-L F of the ``rouge`` package, which the reference calls; an LCS F1 when it is missing."""
    try:
        from rouge import Rouge
    except ImportError:
        p, r = pred.lower().split(), ref.lower().split()
        lcs = _lcs(p, r)
        return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))
    try:
        return Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]
    except Exception:  # noqa: BLE001 - the reference scores an empty or unparsable prediction 0
        return 0.0


def rouge_l_zh(pred: str, ref: str, **_) -> float:
    return rouge_l(" ".join(_zh_words(pred)), " ".join(_zh_words(ref)))


def classification(pred: str, ref: str, all_classes: Sequence[str] = (), **_) -> float:
    """1/|matched classes| if the true class is among the class names found in the prediction.

    A matched class that is a strict substring of the true class is not counted against it, except that the
    reference removes them from the list while iterating over it, which skips the class after each removal:
    kept here, since it changes scores (classes "Ci", "C", "City", truth "City": 0.5, not 1)."""
    matched = [c for c in all_classes if c in pred]
    i = 0
    while i < len(matched):
        if matched[i] in ref and matched[i] != ref:
            del matched[i]  # the next class moves to i, and the reference's iterator moves on to i + 1
        i += 1
    return 1.0 / len(matched) if ref in matched else 0.0


def _share_equal(numbers: list[str], target: str) -> float:
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(pred: str, ref: str, **_) -> float:
    """Share of the numbers in the prediction equal to the paragraph number of the answer."""
    return _share_equal(re.findall(r"\d+", pred), re.findall(r"Paragraph (\d+)", ref)[0])


def retrieval_zh(pred: str, ref: str, **_) -> float:
    return _share_equal(re.findall(r"\d+", pred), re.findall(r"段落(\d+)", ref)[0])


def count(pred: str, ref: str, **_) -> float:
    return _share_equal(re.findall(r"\d+", pred), str(ref))


def _ratio(a: str, b: str) -> float:
    try:
        from fuzzywuzzy import fuzz  # the reference's similarity
    except ImportError:
        return round(100 * difflib.SequenceMatcher(None, a, b).ratio())
    return fuzz.ratio(a, b)


def code_sim(pred: str, ref: str, **_) -> float:
    """Edit similarity of the first generated code line (comments and fences skipped) to the answer."""
    first = ""
    for line in pred.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first = line
            break
    return _ratio(first, ref) / 100


LONGBENCH_METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1, "qa_f1_zh": qa_f1_zh, "rouge": rouge_l, "rouge_zh": rouge_l_zh,
    "classification": classification, "retrieval": retrieval, "retrieval_zh": retrieval_zh,
    "count": count, "code_sim": code_sim,
}


def longbench_score(task: str, metric: str, pred: str, answers: Sequence[str],
                    all_classes: Sequence[str] | None = None) -> float:
    """One sample on 0-100: post-process, then the best score over the reference answers."""
    pred = longbench_postprocess(task, pred)
    fn = LONGBENCH_METRICS[metric]
    return 100.0 * max(fn(pred, a, all_classes=all_classes or ()) for a in answers)


def middle_truncate(ids: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """The reference LongBench truncation: keep the first and the last ``max_tokens // 2`` tokens.

    Returns the two halves (the caller decodes each, as the reference does); unchanged when it fits."""
    ids = list(ids)
    if len(ids) <= max_tokens:
        return ids, []
    half = max_tokens // 2
    return ids[:half], ids[-half:]


# ---------------------------------------------------------------- averages


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def category_averages(scores: dict[str, float], categories: dict[str, Sequence[str]]) -> dict[str, float]:
    """Mean score per category over the tasks present; categories with no task present are left out."""
    out = {}
    for cat, tasks in categories.items():
        present = [scores[t] for t in tasks if t in scores]
        if present:
            out[cat] = mean(present)
    return out
