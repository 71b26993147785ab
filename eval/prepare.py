"""Data preparation: each suite's samples made once into a local cache, then lm-eval task files naming them.

Cache layout (``eval.cache_dir``), reused by every later run and by jobs without internet:
  ruler/<tokenizer>/<length>/<task>.n<samples>.s<seed>.jsonl   generated RULER samples
  longbench/raw/<task>.jsonl                                   the reference records (hub or data_dir)
  longbench/<tokenizer>/<budget>/<task>.jsonl                  rendered, middle-truncated prompts
  short/humaneval.jsonl                                        HumanEval problems
A file is written under a temporary name and renamed, so an interrupted prepare never leaves half a file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from eval import harness
from eval.config import EvalRunConfig, selected_tasks
from eval.metrics import middle_truncate
from eval.suites import LONGBENCH_TASKS, RULER_TASKS

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


# ---------------------------------------------------------------- files


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_leaf(task_dir: Path, name: str, template: Path, **fields: Any) -> str:
    """A task file that includes ``template`` (absolute path) and sets the run's values."""
    task_dir.mkdir(parents=True, exist_ok=True)
    body = {"include": str(template), "task": name, **fields}
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return name


def tokenizer_key(tokenizer_path: str) -> str:
    """Cache key of a tokenizer: its directory name and a hash of its files (same files, same key)."""
    h = hashlib.sha1()
    d = Path(tokenizer_path)
    for f in sorted(d.glob("tokenizer*")) + sorted(d.glob("*.model")) + sorted(d.glob("special_tokens_map.json")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return f"{d.name}-{h.hexdigest()[:10]}"


def load_tokenizer(run: EvalRunConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run.model.tokenizer or run.model.path,
                                         trust_remote_code=run.model.trust_remote_code)


# ---------------------------------------------------------------- RULER


def prepare_ruler(run: EvalRunConfig, tokenizer: Any, cache: Path, task_dir: Path) -> list[LeafTask]:
    cfg = run.suite["ruler"]
    tok_dir = cache / "ruler" / tokenizer_key(run.model.tokenizer or run.model.path)
    # Sources are read only when a file must be generated: importing lm-eval's NIAH module alone takes
    # ~20 s (it builds its word list), and offline nodes with a warm cache must not try the hub.
    sources = functools.cache(lambda kind, arg: harness.essay_haystack(arg) if kind == "essay"
                              else harness.qa_source(kind, arg))
    leaves = []
    for t in (RULER_TASKS[n] for n in selected_tasks(run, "ruler")):
        for length in run.eval.lengths:
            path = tok_dir / str(length) / f"{t.name}.n{cfg.num_samples}.s{run.eval.seed}.jsonl"
            if not path.exists():
                log.info("generating RULER %s at %d tokens (%d samples)", t.name, length, cfg.num_samples)
                haystack = sources("essay", cfg.haystack) if t.needs_essays else None
                qa = sources(t.params["dataset"], getattr(cfg, t.params["dataset"])) if t.kind == "qa" else None
                rows = harness.generate_ruler(t, tokenizer, length, cfg.num_samples, run.eval.seed, haystack, qa)
                write_jsonl(path, ({**r, "metric": t.metric, "task": t.name} for r in rows))
            name = write_leaf(task_dir, f"longattn_ruler_{t.name}_{length}", TEMPLATES / "ruler.yaml",
                              dataset_kwargs={"data_files": {"test": str(path)}},
                              generation_kwargs={"do_sample": False, "temperature": 0.0,
                                                 "max_gen_toks": t.max_gen_toks, "until": []})
            leaves.append(LeafTask(name, "ruler", t.name, str(length), "score"))
    return leaves


# ---------------------------------------------------------------- LongBench


def longbench_raw(run: EvalRunConfig, task: str, cache: Path) -> list[dict]:
    """Reference-format records: from suite.longbench.data_dir, else downloaded once into the cache."""
    data_dir = run.suite["longbench"].data_dir
    if data_dir:
        return read_jsonl(Path(data_dir) / f"{task}.jsonl")
    path = cache / "longbench" / "raw" / f"{task}.jsonl"
    if not path.exists():
        write_jsonl(path, harness.load_hub_longbench(task))
    return read_jsonl(path)


def truncated_prompt(tokenizer: Any, prompt: str, budget: int) -> str:
    """Middle truncation as the reference: decode the first and last halves separately and join."""
    head, tail = middle_truncate(tokenizer(prompt, add_special_tokens=False).input_ids, budget)
    if not tail:
        return prompt
    return tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True)


def prepare_longbench(run: EvalRunConfig, tokenizer: Any, cache: Path, task_dir: Path) -> list[LeafTask]:
    cfg = run.suite["longbench"]
    tok = tokenizer_key(run.model.tokenizer or run.model.path)
    leaves = []
    for name in selected_tasks(run, "longbench"):
        spec = harness.longbench_task_spec(name)
        max_gen = int(spec["generation_kwargs"]["max_gen_toks"])
        budget = cfg.max_prompt_tokens or run.model.max_length - max_gen
        path = cache / "longbench" / tok / str(budget) / f"{name}.jsonl"
        if cfg.data_dir or not path.exists():  # local data may change between runs: cheap to redo
            meta = LONGBENCH_TASKS[name]
            rows = ({"prompt": truncated_prompt(tokenizer, harness.render_prompt(spec["doc_to_text"], r), budget),
                     "answers": list(r["answers"]), "all_classes": r.get("all_classes") or [],
                     "task": name, "metric": meta.metric, "length": r.get("length"), "_id": r.get("_id")}
                    for r in longbench_raw(run, name, cache))
            write_jsonl(path, rows)
        # samsum stops at a newline as the reference; the other tasks generate to max_gen (first line kept later).
        until = ["\n"] if name == "samsum" else []
        leaf = write_leaf(task_dir, f"longattn_longbench_{name}", TEMPLATES / "longbench.yaml",
                          dataset_kwargs={"data_files": {"test": str(path)}},
                          generation_kwargs={"do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen,
                                             "until": until})
        leaves.append(LeafTask(leaf, "longbench", name, "all", "score"))
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


def prepare_short(run: EvalRunConfig, cache: Path, task_dir: Path) -> list[LeafTask]:
    from eval.suites import SHORT_METRICS

    cfg = run.suite["short"]
    data = Path(cfg.data_dir).resolve() if cfg.data_dir else None
    leaves: list[LeafTask] = []
    for task in selected_tasks(run, "short"):
        metric = SHORT_METRICS[task]
        if task == "humaneval":
            path = data / "humaneval.jsonl" if data else cache / "short" / "humaneval.jsonl"
            if not path.exists():
                write_jsonl(path, harness.load_hub_humaneval())
            name = write_leaf(task_dir, "longattn_humaneval", TEMPLATES / "humaneval.yaml",
                              dataset_kwargs={"data_files": {"test": str(path)}})
            leaves.append(LeafTask(name, "short", task, "all", metric))
        elif data:
            leaves += _local_mc(task_dir, data, task, metric)
        else:  # lm-eval's built-in hub task; `prepare` loads it once so the datasets cache holds it
            leaves.append(LeafTask(task, "short", task, "all", metric, 100.0))
    return leaves


def prepare(run: EvalRunConfig, task_dir: Path) -> list[LeafTask]:
    """Make (or reuse) every selected suite's data and write the run's task files."""
    cache = Path(os.path.expanduser(run.eval.cache_dir)).resolve()
    tokenizer = load_tokenizer(run) if {"ruler", "longbench"} & set(run.suite) else None
    leaves: list[LeafTask] = []
    if "ruler" in run.suite:
        leaves += prepare_ruler(run, tokenizer, cache, task_dir)
    if "longbench" in run.suite:
        leaves += prepare_longbench(run, tokenizer, cache, task_dir)
    if "short" in run.suite:
        leaves += prepare_short(run, cache, task_dir)
        hub = [leaf.name for leaf in leaves if leaf.suite == "short" and not leaf.name.startswith("longattn_")]
        if hub and run.eval.prepare_only:
            harness.warm_hub_tasks(hub)
    return leaves
