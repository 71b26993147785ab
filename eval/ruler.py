"""RULER samples from lm-eval's generators, sized and prompted as the reference RULER does.

lm-eval 0.4.13 ports the reference generators (NVIDIA/RULER c5341b4) but changes three things that reach
the model: it sizes NIAH and QA samples without their answer prefix, counts tokens with the tokenizer's
special tokens (BOS), and renders only ``input`` + the stripped prefix, which drops CWE's worked example and
VT's trailing space. Here the generators get the reference template with its answer prefix, a tokenizer
that counts as the reference's ``text_to_tokens`` (no special tokens), CWE is sized with its example as the
reference does, and each record keeps ``input`` and the exact ``answer_prefix``: the model receives
``input + answer_prefix``, the reference's prompt. This module and eval/harness.py import lm-eval.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eval.suites import RULER_NIAH_ANSWER_PREFIX, RULER_QA_ANSWER_PREFIX, RulerTask
from longattn.common.errors import ConfigError

log = logging.getLogger(__name__)

ESSAY_DATASET = "baber/paul_graham_essays"
"""The hub dataset of lm-eval's essay haystack (``prepare_niah.get_haystack``): the reference's essays."""


class ReferenceCounter:
    """A tokenizer whose ``(text).input_ids`` has no special tokens: the reference sizes samples with
    ``tokenizer.tokenize(text)``, lm-eval's generators with ``tokenizer(text).input_ids`` (BOS included)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, text: str, **kwargs: Any) -> Any:
        return self.tokenizer(text, add_special_tokens=False, **kwargs)


# ---------------------------------------------------------------- sources


def punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return True
    except LookupError:
        return False


def download_punkt() -> bool:
    """nltk's sentence model for the essay haystack (prepare time, on a node with internet)."""
    import nltk

    return bool(nltk.download("punkt_tab", quiet=True)) and punkt_available()


@contextlib.contextmanager
def _no_nltk_download() -> Iterator[None]:
    """Importing lm-eval's NIAH module downloads punkt_tab when it is missing; a run must not change its
    own sentence-split mode half-way (the cache key records it), so downloads happen only in ``prepare``."""
    import nltk

    original = nltk.download
    nltk.download = lambda *a, **k: False
    try:
        yield
    finally:
        nltk.download = original


def _niah_module() -> Any:
    with _no_nltk_download():
        from lm_eval.tasks.ruler import prepare_niah
    return prepare_niah


def qa_url(dataset: str) -> str:
    """Where lm-eval's reader fetches SQuAD v2 dev / HotpotQA dev-distractor (its default ``url``)."""
    from lm_eval.tasks.ruler import qa_utils

    reader = qa_utils.read_squad if dataset == "squad" else qa_utils.read_hotpotqa
    return inspect.signature(reader).parameters["url"].default


def essay_words(path: str | Path) -> list[str]:
    """The essay haystack as lm-eval and the reference build it: whitespace runs collapsed, split on spaces."""
    return re.sub(r"\s+", " ", Path(path).read_text(encoding="utf-8")).split(" ")


def _simple_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


@contextlib.contextmanager
def _sentence_splitter(prepare_niah: Any) -> Iterator[None]:
    """nltk's punkt splits the essay haystack; without it (offline), split on sentence punctuation."""
    if punkt_available():
        yield
        return
    log.warning("nltk punkt_tab is missing (offline): essay haystacks split sentences on punctuation")
    original = prepare_niah.cached_sent_tokenize
    prepare_niah.cached_sent_tokenize = _simple_sentences
    try:
        yield
    finally:
        prepare_niah.cached_sent_tokenize = original


def qa_source(dataset: str, path: Path) -> tuple[list[dict], list[str]]:
    """(questions, documents) of SQuAD or HotpotQA from a local JSON file, through lm-eval's readers."""
    from lm_eval.tasks.ruler import qa_utils

    original = qa_utils.download_json
    qa_utils.download_json = lambda url: json.loads(Path(url).read_text(encoding="utf-8"))
    try:
        reader = qa_utils.read_squad if dataset == "squad" else qa_utils.read_hotpotqa
        return reader.__wrapped__(str(path))  # past functools.cache: a changed file is read again
    finally:
        qa_utils.download_json = original


# ---------------------------------------------------------------- generators


def _split(row: dict[str, Any], at: int, length: int) -> dict[str, Any]:
    """A record: the text before the answer prefix, the prefix itself, references and sizes."""
    if at < 0:
        raise RuntimeError(f"answer prefix not found in a generated sample: {row['input'][-200:]!r}")
    text = row["input"]
    return {"index": row["index"], "input": text[:at], "answer_prefix": text[at:], "outputs": row["outputs"],
            "length": row["length"], "max_length": length}


def _niah(task: RulerTask, tok: Any, length: int, n: int, seed: int, haystack: list[str] | None) -> list[dict]:
    from lm_eval.tasks.ruler import niah_utils

    prepare_niah = _niah_module()
    p = dict(task.params)
    hay = haystack if p["type_haystack"] == "essay" else prepare_niah.get_haystack(p["type_haystack"])
    # The reference template carries the answer prefix, so a sample is sized with it (lm-eval's is not).
    template = niah_utils.TEMPLATE + RULER_NIAH_ANSWER_PREFIX
    with _sentence_splitter(prepare_niah) if task.needs_essays else contextlib.nullcontext():
        rows = prepare_niah.generate_samples(hay, TOKENIZER=ReferenceCounter(tok), max_seq_length=length,
                                             template=template, num_samples=n, tokens_to_generate=task.max_gen_toks,
                                             random_seed=seed, **p)
    marker = RULER_NIAH_ANSWER_PREFIX[:len(" The special magic")]
    return [_split(r, r["input"].rfind(marker), length) for r in rows]


def _vt(task: RulerTask, tok: Any, length: int, n: int) -> list[dict]:
    from lm_eval.tasks.ruler import vt_utils

    counter = ReferenceCounter(tok)
    icl = vt_utils.sys_vartrack_w_noise_random(tokenizer=counter, num_samples=1, max_seq_length=500, incremental=5,
                                               **task.params)[0]
    rows = vt_utils.sys_vartrack_w_noise_random(tokenizer=counter, num_samples=n, max_seq_length=length,
                                                icl_example=icl, tokens_to_generate=task.max_gen_toks, **task.params)
    # lm-eval strips the prefix " Answer: ... they are: " to gen_prefix; the reference keeps both spaces.
    return [{"index": r["index"], "input": r["input"], "answer_prefix": f" {r['gen_prefix']} ",
             "outputs": r["outputs"], "length": r["length"], "max_length": length} for r in rows]


def _cwe_sample(cwe: Any, num_words: int, length: int) -> tuple[str, list[str]]:
    """The reference's CWE prompt: the worked example with its answer, a newline, then the question."""
    example, question, answer = cwe.generate_input_output(num_words, length)
    return example + "\n" + question, answer


def _cwe(task: RulerTask, tok: Any, length: int, n: int, incremental: int = 10) -> list[dict]:
    """The reference's sizing loop (lm-eval's leaves the example out of each sample's length check)."""
    from lm_eval.tasks.ruler import cwe_utils

    def tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    num_words, total = incremental, 0
    while total + task.max_gen_toks < length:
        text, answer = _cwe_sample(cwe_utils, num_words, length)
        total = tokens(text + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer)))
        if total + task.max_gen_toks > length:
            num_words -= incremental
            break
        num_words += incremental
        if num_words > len(cwe_utils.WORDS):
            num_words = len(cwe_utils.WORDS)
            break
    rows = []
    for index in range(n):
        used = max(num_words, incremental)
        while True:  # shrink until the sample fits (the reference loops forever below ``incremental``)
            text, answer = _cwe_sample(cwe_utils, used, length)
            size = tokens(text) + task.max_gen_toks
            if size <= length or used <= incremental:
                break
            used -= incremental
        at = text.rfind(cwe_utils.CONFIG["answer_prefix"])
        rows.append(_split({"index": index, "input": text, "outputs": answer, "length": size}, at, length))
    return rows


def _fwe(task: RulerTask, tok: Any, length: int, n: int) -> list[dict]:
    from lm_eval.tasks.ruler import fwe_utils

    rows = fwe_utils.sys_kwext(tokenizer=ReferenceCounter(tok), max_seq_length=length, num_samples=n,
                               tokens_to_generate=task.max_gen_toks)
    return [{"index": r["index"], "input": r["input"], "answer_prefix": fwe_utils.CONFIG["answer_prefix"],
             "outputs": r["outputs"], "length": r["length"], "max_length": length} for r in rows]


def _qa(task: RulerTask, tok: Any, length: int, n: int, qa: tuple[list[dict], list[str]]) -> list[dict]:
    from lm_eval.tasks.ruler import qa_utils

    qas, docs = qa
    if len(qas) < n:  # the reference would fail on QAS[index] as well
        raise ConfigError(f"suite.ruler.num_samples={n}: the {task.params['dataset']} source has only {len(qas)} "
                          f"answerable questions for {task.name}")
    original = qa_utils.TEMPLATE
    qa_utils.TEMPLATE = qa_utils.CONFIG["template"] + RULER_QA_ANSWER_PREFIX  # sized with the prefix
    try:
        rows = qa_utils.generate_samples(tokenizer=ReferenceCounter(tok), docs=docs, qas=qas, max_seq_length=length,
                                         num_samples=n, tokens_to_generate=task.max_gen_toks)
    finally:
        qa_utils.TEMPLATE = original
    return [_split(r, r["input"].rfind(RULER_QA_ANSWER_PREFIX), length) for r in rows]


def generate(task: RulerTask, tokenizer: Any, length: int, num_samples: int, seed: int,
             haystack: list[str] | None = None, qa: tuple[list[dict], list[str]] | None = None) -> list[dict]:
    """Records of one RULER task at one length: ``input``, ``answer_prefix``, ``outputs``, ``length``."""
    random.seed(seed)
    np.random.seed(seed)
    if task.kind == "niah":
        return _niah(task, tokenizer, length, num_samples, seed, haystack)
    if task.kind == "vt":
        return _vt(task, tokenizer, length, num_samples)
    if task.kind == "cwe":
        return _cwe(task, tokenizer, length, num_samples)
    if task.kind == "fwe":
        return _fwe(task, tokenizer, length, num_samples)
    if task.kind == "qa":
        return _qa(task, tokenizer, length, num_samples, qa)
    raise ValueError(f"unknown RULER generator {task.kind!r}")
