"""Data preparation: each suite's samples made once into the cache, then lm-eval task files naming them.

Cache layout (``eval.cache_dir``), every data file named by a digest of what produced it (eval/cache.py):
  sources/                                     the benchmarks' published data, fetched once (eval/sources.py)
  ruler/<tokenizer>/<length>/<task>.n<N>.s<seed>.<digest>.jsonl        generated RULER samples
  longbench/<tokenizer>/<budget>/<task>.<digest>.jsonl                 reference prompts, middle-truncated
Each record carries ``n_tokens``, its prompt's length as the backend encodes it, so the backend can be given
room for every prompt plus its generation (eval/run.py): it never truncates.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from eval import harness, ruler
from eval.cache import content_fingerprint, fingerprint, keyed_records, tokenizer_fingerprint, versions
from eval.config import EvalRunConfig, selected_tasks
from eval.longbench_prompts import MAX_GEN, PROMPTS
from eval.metrics import middle_truncate
from eval.sources import (
    HUMANEVAL_DATASET,
    LONGBENCH_REPO,
    Source,
    download_hub_jsonl,
    download_hub_text,
    download_longbench_zip,
    download_url,
    fetch,
    offline,
)
from eval.suites import LONGBENCH_TASKS, RULER_TASKS, SHORT_METRICS
from longattn.common.io import read_jsonl

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).resolve().parent / "tasks"


@dataclass
class LeafTask:
    """One lm-eval task the run evaluates, and where its score goes in results.json."""

    name: str
    """lm-eval task name (a leaf YAML in out_dir/tasks, or a built-in task)."""
    suite: str
    task: str
    """Reference task name."""
    key: str
    """Column: the RULER length, or ``all``."""
    metric: str
    """lm-eval metric key (``score``, ``pass@1``, ``acc``, ``acc_norm``)."""
    scale: float = 1.0
    """Factor to 0-100 (lm-eval's accuracies are 0-1)."""
    max_tokens: int = 0
    """Longest prompt in tokens, as the backend encodes it (0: not measured, short multiple-choice tasks)."""
    max_gen_toks: int = 0
    """Tokens generated per sample (0 for multiple-choice tasks)."""


def cache_root(run: EvalRunConfig) -> Path:
    return Path(os.path.expanduser(run.eval.cache_dir)).resolve()


def prepare_command(run: EvalRunConfig, suite: str) -> str:
    """The command that fills the cache for ``suite`` on a node with internet."""
    parts = ["longattn-eval eval.prepare_only=true", f"suite=[{suite}]", f"model.path={run.model.path}"]
    if run.model.tokenizer:
        parts.append(f"model.tokenizer={run.model.tokenizer}")
    if suite == "ruler":
        parts.append(f"eval.lengths=[{','.join(map(str, run.eval.lengths))}]")
    return " ".join([*parts, f"eval.cache_dir={cache_root(run)}"])


class _TaskFileLoader(yaml.SafeLoader):
    """Reads lm-eval task files for their values; ``!function`` tags are left unresolved."""


_TaskFileLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def write_leaf(task_dir: Path, name: str, template: Path, **fields: Any) -> str:
    """A task file that includes ``template`` (absolute path) and sets the run's values."""
    task_dir.mkdir(parents=True, exist_ok=True)
    body = {"include": str(template), "task": name, **fields}
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return name


def load_tokenizer(run: EvalRunConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run.model.tokenizer or run.model.path,
                                         trust_remote_code=run.model.trust_remote_code)


def backend_tokens(tokenizer: Any) -> Callable[[str], int]:
    """Prompt length as lm-eval's backends encode it: the tokenizer's defaults (BOS included)."""
    return lambda text: len(tokenizer(text).input_ids)


def greedy(max_gen: int, **extra: Any) -> dict[str, Any]:
    return {"do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen, "until": [], **extra}


# ---------------------------------------------------------------- RULER


class RulerSources:
    """The essay haystack and the QA datasets: a configured local file, else the cached hub copy."""

    def __init__(self, run: EvalRunConfig, cache: Path):
        self.cfg, self.cache, self.cmd = run.suite["ruler"], cache, prepare_command(run, "ruler")

    @functools.cached_property
    def essays(self) -> tuple[Path, dict[str, Any]]:
        if self.cfg.haystack:
            return Path(self.cfg.haystack), fingerprint(self.cfg.haystack)
        src = Source("RULER essay haystack (Paul Graham essays)", f"hub dataset {ruler.ESSAY_DATASET}",
                     "ruler/paul_graham_essays.txt", local="suite.ruler.haystack=<text file>")
        path = fetch(src, self.cache, download_hub_text(ruler.ESSAY_DATASET), self.cmd)
        return path, {"origin": src.origin, **content_fingerprint(path)}

    @functools.cache  # noqa: B019 - one instance per prepare
    def qa(self, dataset: str) -> tuple[Path, dict[str, Any]]:
        local = getattr(self.cfg, dataset)
        if local:
            return Path(local), fingerprint(local)
        url = ruler.qa_url(dataset)
        name = "SQuAD v2 dev (RULER qa_1)" if dataset == "squad" else "HotpotQA dev distractor (RULER qa_2)"
        src = Source(name, url, f"ruler/{Path(url).name}", local=f"suite.ruler.{dataset}=<json file>", url=True)
        path = fetch(src, self.cache, download_url(url), self.cmd)
        return path, {"origin": url, **content_fingerprint(path)}

    def for_task(self, task: Any) -> tuple[Path | None, dict[str, Any] | None]:
        if task.needs_essays:
            return self.essays
        if task.kind == "qa":
            return self.qa(task.params["dataset"])
        return None, None


def _ruler_rows(task: Any, tokenizer: Any, length: int, run: EvalRunConfig, source: Path | None) -> Iterator[dict]:
    cfg, count = run.suite["ruler"], backend_tokens(tokenizer)
    haystack = ruler.essay_words(source) if task.needs_essays else None
    qa = ruler.qa_source(task.params["dataset"], source) if task.kind == "qa" else None
    log.info("generating RULER %s at %d tokens (%d samples)", task.name, length, cfg.num_samples)
    for r in ruler.generate(task, tokenizer, length, cfg.num_samples, run.eval.seed, haystack, qa):
        yield {**r, "task": task.name, "metric": task.metric, "n_tokens": count(r["input"] + r["answer_prefix"])}


def prepare_ruler(run: EvalRunConfig, tokenizer: Any, cache: Path, task_dir: Path) -> list[LeafTask]:
    cfg, tok = run.suite["ruler"], tokenizer_fingerprint(run.model.tokenizer or run.model.path)
    sources = RulerSources(run, cache)
    leaves = []
    for t in (RULER_TASKS[n] for n in selected_tasks(run, "ruler")):
        for length in run.eval.lengths:
            source, source_fp = sources.for_task(t)
            key = {"task": t.name, "kind": t.kind, "params": t.params, "max_gen_toks": t.max_gen_toks,
                   "length": length, "num_samples": cfg.num_samples, "seed": run.eval.seed, "tokenizer": tok,
                   "source": source_fp, "versions": versions(),
                   "sentence_split": ("punkt" if ruler.punkt_available() else "punctuation") if t.needs_essays else None}
            stem = cache / "ruler" / f"{tok['name']}-{tok['sha256'][:10]}" / str(length) / \
                f"{t.name}.n{cfg.num_samples}.s{run.eval.seed}"
            path, meta = keyed_records(stem, key, lambda t=t, length=length, source=source:
                                       _ruler_rows(t, tokenizer, length, run, source), lambda r: r["n_tokens"])
            name = write_leaf(task_dir, f"longattn_ruler_{t.name}_{length}", TEMPLATES / "ruler.yaml",
                              dataset_kwargs={"data_files": {"test": str(path)}},
                              generation_kwargs=greedy(t.max_gen_toks))
            leaves.append(LeafTask(name, "ruler", t.name, str(length), "score", 1.0, meta["max_tokens"],
                                   t.max_gen_toks))
    return leaves


# ---------------------------------------------------------------- LongBench


def longbench_source(run: EvalRunConfig, task: str, cache: Path) -> tuple[Path, dict[str, Any]]:
    """The reference-format records of ``task``: suite.longbench.data_dir, else the reference's hub data."""
    data_dir = run.suite["longbench"].data_dir
    if data_dir:
        path = Path(data_dir) / f"{task}.jsonl"
        return path, fingerprint(path)
    src = Source("LongBench data (data.zip of the reference)", f"hub dataset {LONGBENCH_REPO}", "longbench/data",
                 local="suite.longbench.data_dir=<directory of <task>.jsonl files>")
    path = fetch(src, cache, download_longbench_zip, prepare_command(run, "longbench")) / f"{task}.jsonl"
    return path, {"origin": src.origin, **content_fingerprint(path)}


def reference_prompt(task: str, record: dict[str, Any]) -> str:
    """The reference's prompt: its template filled with the record (``str.format``, as pred.py)."""
    return PROMPTS[task].format(**record)


def truncate_middle(tokenizer: Any, prompt: str, budget: int) -> tuple[str, bool]:
    """The reference's truncation: tokens counted with the tokenizer's defaults; over ``budget``, the first
    and last ``budget // 2`` tokens, each half decoded without special tokens and the two texts joined."""
    head, tail = middle_truncate(tokenizer(prompt, truncation=False).input_ids, budget)
    if not tail:
        return prompt, False
    return tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True), True


def _longbench_rows(task: str, source: Path, tokenizer: Any, budget: int) -> Iterator[dict]:
    count, meta = backend_tokens(tokenizer), LONGBENCH_TASKS[task]
    for r in read_jsonl(source):
        prompt, cut = truncate_middle(tokenizer, reference_prompt(task, r), budget)
        yield {"prompt": prompt, "answers": list(r["answers"]), "all_classes": r.get("all_classes") or [],
               "task": task, "metric": meta.metric, "language": meta.language, "length": r.get("length"),
               "_id": r.get("_id"), "truncated": cut, "n_tokens": count(prompt)}


def samsum_stop(tokenizer: Any, backend: str) -> dict[str, Any]:
    """The reference stops samsum on the newline token (the last of ``encode("\\n")``) or EOS, after at least
    one generated token (``min_length = context + 1``): token ids, not a text stop, as each backend takes them."""
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    if backend == "vllm":
        return {"stop_token_ids": [newline], "min_tokens": 1}
    return {"eos_token_id": [t for t in (tokenizer.eos_token_id, newline) if t is not None], "min_new_tokens": 1}


def prepare_longbench(run: EvalRunConfig, tokenizer: Any, cache: Path, task_dir: Path) -> list[LeafTask]:
    budget, tok = run.suite["longbench"].max_prompt_tokens, tokenizer_fingerprint(run.model.tokenizer or run.model.path)
    leaves = []
    for name in selected_tasks(run, "longbench"):
        source, source_fp = longbench_source(run, name, cache)
        key = {"task": name, "template": PROMPTS[name], "budget": budget, "tokenizer": tok, "source": source_fp,
               "versions": versions()}
        stem = cache / "longbench" / f"{tok['name']}-{tok['sha256'][:10]}" / str(budget) / name
        path, meta = keyed_records(stem, key, lambda name=name, source=source:
                                   _longbench_rows(name, source, tokenizer, budget), lambda r: r["n_tokens"])
        stop = samsum_stop(tokenizer, run.eval.backend) if name == "samsum" else {}
        leaf = write_leaf(task_dir, f"longattn_longbench_{name}", TEMPLATES / "longbench.yaml",
                          dataset_kwargs={"data_files": {"test": str(path)}},
                          generation_kwargs=greedy(MAX_GEN[name], **stop))
        leaves.append(LeafTask(leaf, "longbench", name, "all", "score", 1.0, meta["max_tokens"], MAX_GEN[name]))
    return leaves


# ---------------------------------------------------------------- short suites


def _local_mc(task_dir: Path, data: Path, task: str, metric: str) -> list[LeafTask]:
    """MMLU (a file per subject), HellaSwag, OpenBookQA from local files, through lm-eval's own task files."""
    if task == "mmlu":
        subjects = sorted(p.stem for p in (data / "mmlu").glob("*.jsonl") if not p.stem.endswith("_dev"))
        leaves = []
        for s in subjects:
            dev = data / "mmlu" / f"{s}_dev.jsonl"
            files = {"test": str(data / "mmlu" / f"{s}.jsonl"), **({"dev": str(dev)} if dev.exists() else {})}
            name = write_leaf(task_dir, f"longattn_mmlu_{s}", harness.short_task_file("mmlu", s),
                              dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files},
                              fewshot_split="dev" if dev.exists() else None)
            leaves.append(LeafTask(name, "short", "mmlu", "all", metric, 100.0))
        return leaves
    split = "validation" if task == "hellaswag" else "test"
    name = write_leaf(task_dir, f"longattn_{task}", harness.short_task_file(task), dataset_path="json",
                      dataset_name=None, dataset_kwargs={"data_files": {split: str(data / f"{task}.jsonl")}},
                      training_split=None, validation_split=split if split == "validation" else None)
    return [LeafTask(name, "short", task, "all", metric, 100.0)]


def humaneval_leaf(run: EvalRunConfig, cache: Path, task_dir: Path, tokenizer: Any) -> LeafTask:
    data_dir = run.suite["short"].data_dir
    if data_dir:
        path = Path(data_dir).resolve() / "humaneval.jsonl"
    else:
        src = Source("HumanEval", f"hub dataset {HUMANEVAL_DATASET}", "humaneval/test.jsonl",
                     local="suite.short.data_dir=<directory with humaneval.jsonl>")
        path = fetch(src, cache, download_hub_jsonl(HUMANEVAL_DATASET, "test"), prepare_command(run, "short"))
    spec = yaml.load((TEMPLATES / "humaneval.yaml").read_text(encoding="utf-8"), Loader=_TaskFileLoader)
    count = backend_tokens(tokenizer)
    longest = max((count(r["prompt"]) for r in read_jsonl(path)), default=0)
    name = write_leaf(task_dir, "longattn_humaneval", TEMPLATES / "humaneval.yaml",
                      dataset_kwargs={"data_files": {"test": str(path)}})
    return LeafTask(name, "short", "humaneval", "all", "pass@1", 1.0, longest,
                    int(spec["generation_kwargs"]["max_gen_toks"]))


def prepare_short(run: EvalRunConfig, tokenizer: Any, cache: Path, task_dir: Path) -> list[LeafTask]:
    cfg = run.suite["short"]
    data = Path(cfg.data_dir).resolve() if cfg.data_dir else None
    leaves: list[LeafTask] = []
    for task in selected_tasks(run, "short"):
        if task == "humaneval":
            leaves.append(humaneval_leaf(run, cache, task_dir, tokenizer))
        elif data:
            leaves += _local_mc(task_dir, data, task, SHORT_METRICS[task])
        else:  # lm-eval's built-in hub task; `prepare` loads it once so the datasets cache holds it
            leaves.append(LeafTask(task, "short", task, "all", SHORT_METRICS[task], 100.0))
    return leaves


def prepare(run: EvalRunConfig, task_dir: Path) -> list[LeafTask]:
    """Make (or reuse) every selected suite's data and write the run's task files."""
    cache = cache_root(run)
    if run.eval.prepare_only and "ruler" in run.suite and not offline() and not ruler.punkt_available():
        log.info("nltk punkt_tab (essay sentence split) downloaded: %s", ruler.download_punkt())
    tokenizer = load_tokenizer(run)
    leaves: list[LeafTask] = []
    if "ruler" in run.suite:
        leaves += prepare_ruler(run, tokenizer, cache, task_dir)
    if "longbench" in run.suite:
        leaves += prepare_longbench(run, tokenizer, cache, task_dir)
    if "short" in run.suite:
        leaves += prepare_short(run, tokenizer, cache, task_dir)
        hub = [leaf.name for leaf in leaves if leaf.suite == "short" and not leaf.name.startswith("longattn_")]
        if hub and run.eval.prepare_only:
            harness.warm_hub_tasks(hub, prepare_command(run, "short"))
    return leaves
