"""The one module that imports lm-evaluation-harness: RULER generators, task prompts, the evaluator.

lm-eval is the engine: its RULER generators make the samples, its LongBench task files hold the prompts,
its backends run the model. The project adds caching, reference metrics (eval/tasks/hooks.py) and
middle truncation around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eval.suites import RulerTask

log = logging.getLogger(__name__)


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


# ---------------------------------------------------------------- RULER generation


def _simple_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


@contextlib.contextmanager
def _sentence_splitter() -> Iterator[None]:
    """nltk's punkt model (a download) splits the essay haystack; offline, split on sentence punctuation."""
    from lm_eval.tasks.ruler import prepare_niah

    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
        yield
        return
    except LookupError:
        log.warning("nltk punkt_tab is missing (offline): essay haystacks split sentences on punctuation")
    original = prepare_niah.cached_sent_tokenize
    prepare_niah.cached_sent_tokenize = _simple_sentences
    try:
        yield
    finally:
        prepare_niah.cached_sent_tokenize = original


def essay_haystack(path: str | None) -> list[str]:
    """Words of the essay haystack: a local text file, or the Paul Graham essays from the hub."""
    if path is None:
        from lm_eval.tasks.ruler.prepare_niah import get_haystack

        return get_haystack(type_haystack="essay")
    return re.sub(r"\s+", " ", Path(path).read_text(encoding="utf-8")).split(" ")


@contextlib.contextmanager
def _local_json_reader() -> Iterator[None]:
    """lm-eval's SQuAD/HotpotQA readers fetch a URL; let them read a local file too."""
    from lm_eval.tasks.ruler import qa_utils

    original = qa_utils.download_json

    def read(url: str) -> Any:
        if Path(url).exists():
            return json.loads(Path(url).read_text(encoding="utf-8"))
        return original(url)

    qa_utils.download_json = read
    try:
        yield
    finally:
        qa_utils.download_json = original


def qa_source(dataset: str, path: str | None) -> tuple[list[dict], list[str]]:
    """(questions, documents) of SQuAD or HotpotQA, through lm-eval's readers."""
    from lm_eval.tasks.ruler import qa_utils

    reader = qa_utils.read_squad if dataset == "squad" else qa_utils.read_hotpotqa
    with _local_json_reader():
        return reader(path) if path else reader()


def generate_ruler(task: RulerTask, tokenizer: Any, length: int, num_samples: int, seed: int,
                   haystack: list[str] | None = None, qa: tuple[list[dict], list[str]] | None = None) -> list[dict]:
    """Samples of one RULER task at one length (lm-eval's generators, seeded)."""
    random.seed(seed)
    np.random.seed(seed)
    if task.kind == "niah":
        from lm_eval.tasks.ruler import niah_utils, prepare_niah

        p = dict(task.params)
        hay = haystack if p["type_haystack"] == "essay" else prepare_niah.get_haystack(p["type_haystack"])
        with _sentence_splitter() if task.needs_essays else contextlib.nullcontext():
            return prepare_niah.generate_samples(hay, TOKENIZER=tokenizer, max_seq_length=length,
                                                 template=niah_utils.TEMPLATE, num_samples=num_samples,
                                                 tokens_to_generate=task.max_gen_toks, random_seed=seed, **p)
    if task.kind == "vt":
        from lm_eval.tasks.ruler import vt_utils

        icl = vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=1, max_seq_length=500,
                                                   incremental=5)[0]
        return vt_utils.sys_vartrack_w_noise_random(tokenizer=tokenizer, num_samples=num_samples,
                                                    max_seq_length=length, icl_example=icl, **task.params)
    if task.kind == "cwe":
        from lm_eval.tasks.ruler import cwe_utils

        return cwe_utils.sys_word_pair_random(num_samples=num_samples, max_seq_length=length, tokenizer=tokenizer)
    if task.kind == "fwe":
        from lm_eval.tasks.ruler import fwe_utils

        return fwe_utils.sys_kwext(tokenizer=tokenizer, max_seq_length=length, num_samples=num_samples)
    if task.kind == "qa":
        from lm_eval.tasks.ruler import qa_utils

        qas, docs = qa
        return qa_utils.generate_samples(tokenizer=tokenizer, docs=docs, qas=qas, max_seq_length=length,
                                         num_samples=num_samples, tokens_to_generate=task.max_gen_toks)
    raise ValueError(f"unknown RULER generator {task.kind!r}")


# ---------------------------------------------------------------- LongBench prompts


def longbench_task_spec(name: str) -> dict[str, Any]:
    """lm-eval's task file for a LongBench dataset: prompt template and generation length."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(lm_eval_tasks_dir() / "longbench" / f"{name}.yaml", resolve_func=False)


def render_prompt(template: str, doc: dict[str, Any]) -> str:
    """Fill lm-eval's Jinja prompt with a reference-format record (its ``input`` is lm-eval's ``question``)."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(template).render(**{"question": doc.get("input", ""), **doc})


def load_hub_longbench(name: str) -> list[dict]:
    """The records lm-eval reads (its parquet mirror of THUDM/LongBench, whose loader script newer
    ``datasets`` no longer run)."""
    import datasets

    spec = longbench_task_spec(name)
    return list(datasets.load_dataset(spec["dataset_path"], spec["dataset_name"], split=spec["test_split"]))


def load_hub_humaneval() -> list[dict]:
    import datasets

    return list(datasets.load_dataset("openai/openai_humaneval", split="test"))


def short_task_file(name: str, subject: str | None = None) -> Path:
    """lm-eval's task file of a short suite (MMLU per subject)."""
    base = lm_eval_tasks_dir()
    if name == "mmlu":
        return base / "mmlu" / "default" / f"mmlu_{subject}.yaml"
    return base / name / f"{name}.yaml"


def warm_hub_tasks(names: list[str]) -> None:
    """Load lm-eval's hub tasks once so the datasets cache holds them for offline jobs."""
    from lm_eval.tasks import TaskManager

    TaskManager().load(names)


# ---------------------------------------------------------------- evaluation


def model_args(backend: str, model: Any, ev: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"pretrained": model.path, "dtype": model.dtype,
                            "max_length": model.max_length, "trust_remote_code": model.trust_remote_code}
    if model.tokenizer:
        args["tokenizer"] = model.tokenizer
    if backend == "vllm":
        args.pop("max_length")
        args.update(max_model_len=model.max_length, tensor_parallel_size=ev.tensor_parallel_size,
                    data_parallel_size=ev.data_parallel_size, gpu_memory_utilization=ev.gpu_memory_utilization)
    return args


def build_lm(model: Any, ev: Any) -> Any:
    """The backend, loaded once for every suite of the run."""
    import torch
    from lm_eval.api.registry import get_model

    device = ev.device if ev.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ev.backend == "vllm":
        # RULER's headroom (eval/run.py) may exceed the checkpoint's positions by a few tokens; vllm refuses
        # that unless told, hf simply runs RoPE a few positions further.
        os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    return get_model(ev.backend).create_from_arg_obj(model_args(ev.backend, model, ev),
                                                     {"batch_size": ev.batch_size, "device": device})


def evaluate(lm: Any, tasks: list[str], task_dir: Path, out_dir: Path, ev: Any,
             num_fewshot: int | None = None) -> dict[str, Any]:
    """Run lm-eval on task names (leaf YAMLs in ``task_dir``, or built-in names); write its outputs."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    tracker = EvaluationTracker(output_path=str(out_dir / "lm_eval"))
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)),
                          num_fewshot=num_fewshot, limit=ev.limit, log_samples=ev.log_samples,
                          evaluation_tracker=tracker, random_seed=ev.seed, numpy_random_seed=ev.seed,
                          torch_random_seed=ev.seed, fewshot_random_seed=ev.seed, confirm_run_unsafe_code=True)
    if res is None:  # not rank 0 under accelerate
        return {}
    samples = res.pop("samples", None) if ev.log_samples else None
    tracker.save_results_aggregated(results=res, samples=samples)
    for name, rows in (samples or {}).items():
        tracker.save_results_samples(task_name=name, samples=rows)
    return res
