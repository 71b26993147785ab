"""Typed config schemas of the evaluation stage (``longattn-eval``), registered with Hydra's ConfigStore.

YAML under ``conf/eval.yaml`` and ``conf/suite/`` only sets values; every field is documented here.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from eval.suites import LONGBENCH_TASKS, RULER_TASKS, SHORT_TASKS, SUITES, reference_name
from longattn.common.errors import Choice, ConfigError
from longattn.common.tracking import WandbConfig

__all__ = ["ConfigError", "EvalBackend", "EvalModelConfig", "EvalConfig", "EvalRunConfig", "to_schema", "validate",
           "selected_tasks", "model_name", "register_configs"]


class EvalBackend(Choice):
    hf = "hf"
    """transformers; data parallel with ``accelerate launch``."""
    vllm = "vllm"
    """vllm: tensor / data parallel."""


@dataclass
class EvalModelConfig:
    path: str = MISSING
    """HF model directory (safetensors + tokenizer), e.g. a converted training checkpoint."""
    name: str | None = None
    """Name in results and tables; null = the directory's name."""
    tokenizer: str | None = None
    """Tokenizer directory; null = the model's own. RULER samples are generated (and cached) per tokenizer."""
    dtype: str = "bfloat16"
    """Weights dtype for the backend (use float32 on CPU)."""
    max_length: int = 32768
    """Context the model is evaluated at: lm-eval's max_length and the LongBench truncation budget."""
    trust_remote_code: bool = False
    """Passed to the backend."""


@dataclass
class EvalConfig:
    backend: EvalBackend = EvalBackend.hf
    """``hf`` (transformers; data parallel with ``accelerate launch``) or ``vllm`` (tensor/data parallel)."""
    tasks: list[str] = field(default_factory=list)
    """Subset of tasks: reference names (niah_single_1, qa_1, narrativeqa, mmlu...) or lm-eval's
    (ruler_qa_squad, longbench_trec); empty = whole suites."""
    lengths: list[int] = field(default_factory=lambda: [32768])
    """RULER sequence lengths; each is its own lm-eval task, so ``limit`` applies per length."""
    limit: int | None = None
    """At most this many samples per task (and per RULER length); null = all."""
    batch_size: str = "1"
    """lm-eval batch size (an integer or ``auto``)."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu`` or ``cuda[:i]`` (hf backend)."""
    tensor_parallel_size: int = 1
    """vllm only: GPUs per model replica."""
    data_parallel_size: int = 1
    """vllm only: model replicas (hf: launch with ``accelerate launch --num_processes N``)."""
    gpu_memory_utilization: float = 0.9
    """vllm only: fraction of GPU memory vllm may take."""
    seed: int = 42
    """Seed of RULER generation and of lm-eval's samplers."""
    log_samples: bool = True
    """Write lm-eval's per-sample outputs (samples_*.jsonl) into out_dir/lm_eval/."""
    cache_dir: str = "${oc.env:LONGATTN_EVAL_CACHE,${oc.env:HOME}/.cache/longattn/eval}"
    """Prepared data (RULER samples per tokenizer and length, LongBench prompts, short suites): made once."""
    prepare_only: bool = False
    """Only prepare the data cache (e.g. on a login node with internet), then exit."""


@dataclass
class RulerSuiteConfig:
    num_samples: int = 500
    """Samples generated per task and length (the reference: 500)."""
    haystack: str | None = None
    """Text file of the essay haystack; null = Paul Graham essays from the hub (at ``prepare`` time)."""
    squad: str | None = None
    """SQuAD v2 dev JSON for qa_1; null = downloaded at ``prepare`` time."""
    hotpotqa: str | None = None
    """HotpotQA dev (distractor) JSON for qa_2; null = downloaded at ``prepare`` time."""


@dataclass
class LongBenchSuiteConfig:
    data_dir: str | None = None
    """Directory of ``<task>.jsonl`` in the reference format (input, context, answers, all_classes);
    null = lm-eval's hub mirror of THUDM/LongBench at ``prepare`` time."""
    max_prompt_tokens: int | None = None
    """Middle-truncation budget; null = model.max_length minus the task's generation length."""


@dataclass
class ShortSuiteConfig:
    data_dir: str | None = None
    """Directory of local files (``mmlu/<subject>.jsonl``, ``hellaswag.jsonl``, ``openbookqa.jsonl``,
    ``humaneval.jsonl``) in the hub datasets' formats; null = lm-eval's hub datasets."""
    num_fewshot: dict[str, int] = field(default_factory=dict)
    """Few-shot examples per task (e.g. mmlu: 5); absent = the task's default."""
    humaneval_timeout: float = 10.0
    """Seconds each HumanEval program may run."""


SUITE_SCHEMAS: dict[str, type] = {
    "ruler": RulerSuiteConfig, "longbench": LongBenchSuiteConfig, "short": ShortSuiteConfig,
}


@dataclass
class RunLabelConfig:
    method: str | None = None
    """Selection method of the evaluated model, as the tables name it: Random, ProLong, LongAttn-8,
    LongAttn-70, LLaMA-3 (the base model)."""
    tokens: float | None = None
    """Training tokens in billions (5 for D_x5); null or 0 for the base model."""
    variant: str = ""
    """Ablation variant for Table 4: ``alpha=1`` or ``w/o DU``; empty for the default."""


@dataclass
class EvalRunConfig:
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    suite: dict[str, Any] = field(default_factory=dict)
    """Suites to run (``suite=ruler`` or ``suite=[ruler,longbench,short]``), each with its own settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    label: RunLabelConfig = field(default_factory=RunLabelConfig)
    """What the model is, for the paper's tables (stored in results.json ``meta.label``)."""
    out_dir: str = "runs/eval"
    """results.json, lm-eval's outputs, metrics.jsonl and the resolved config go here."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form tags stored in results.json (method, training tokens...) for the tables."""


def to_schema(cfg: Any) -> EvalRunConfig:
    """Merge the composed YAML into the typed schemas and validate; type errors name the key."""
    suites = OmegaConf.to_container(cfg.get("suite") or {}, resolve=True)
    if isinstance(suites, list | str):  # `suite=ruler` given as a plain value
        suites = {s: {} for s in ([suites] if isinstance(suites, str) else suites)}
    base = OmegaConf.merge(OmegaConf.structured(EvalRunConfig), {k: v for k, v in cfg.items() if k != "suite"})
    run: EvalRunConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    run.eval.tasks = [reference_name(t) for t in run.eval.tasks]
    for name, node in suites.items():
        if name not in SUITE_SCHEMAS:
            raise ConfigError(f"suite={name}: use one or more of {sorted(SUITE_SCHEMAS)}")
        merged = OmegaConf.merge(OmegaConf.structured(SUITE_SCHEMAS[name]), node or {})
        run.suite[name] = OmegaConf.to_object(merged)
    validate(run)
    return run


def selected_tasks(run: EvalRunConfig, suite: str) -> list[str]:
    """Tasks of ``suite`` to run: all of them, or those of ``eval.tasks`` that belong to it."""
    if not run.eval.tasks:
        return list(SUITES[suite])
    return [t for t in SUITES[suite] if t in run.eval.tasks]


def validate(run: EvalRunConfig) -> None:
    """Check before any side effect; errors name the key to change."""
    if not run.suite:
        raise ConfigError("no suite selected: set suite=ruler (or [ruler,longbench,short])")
    if not run.eval.prepare_only and not Path(run.model.path).is_dir():
        raise ConfigError(f"model.path={run.model.path} is not a directory (an HF model directory)")
    tok = run.model.tokenizer or run.model.path
    if {"ruler", "longbench"} & set(run.suite) and not Path(tok).is_dir():
        key = "model.tokenizer" if run.model.tokenizer else "model.path"
        raise ConfigError(f"{key}={tok} is not a directory: RULER and LongBench data are made with its tokenizer")
    known = set(RULER_TASKS) | set(LONGBENCH_TASKS) | set(SHORT_TASKS)
    unknown = [t for t in run.eval.tasks if t not in known]
    if unknown:
        raise ConfigError(f"eval.tasks has unknown names {unknown}; RULER/LongBench/short names, e.g. "
                          "niah_single_1, qa_1, narrativeqa, mmlu")
    if run.eval.tasks and not any(selected_tasks(run, s) for s in run.suite):
        raise ConfigError(f"eval.tasks={run.eval.tasks} selects nothing from suite={list(run.suite)}")
    if not run.eval.lengths or min(run.eval.lengths) < 64:
        raise ConfigError(f"eval.lengths={run.eval.lengths}: give RULER lengths of at least 64 tokens")
    if "ruler" in run.suite and "vt" in selected_tasks(run, "ruler") and min(run.eval.lengths) < 1024:
        # lm-eval's VT generator loops forever when its ~500-token in-context example leaves no room.
        raise ConfigError(f"eval.lengths={run.eval.lengths}: RULER vt needs lengths >= 1024 "
                          "(or leave vt out of eval.tasks)")
    if run.eval.backend == "vllm" and importlib.util.find_spec("vllm") is None and not run.eval.prepare_only:
        raise ConfigError("eval.backend=vllm but vllm is not installed: pip install 'lm-eval[vllm]' "
                          "(GPU nodes), or use eval.backend=hf")
    if run.eval.limit is not None and run.eval.limit < 1:
        raise ConfigError(f"eval.limit={run.eval.limit} must be >= 1 (or null for all)")
    if "ruler" in run.suite and run.suite["ruler"].num_samples < 1:
        raise ConfigError("suite.ruler.num_samples must be >= 1")
    for name, path in _local_paths(run):
        if path and not Path(os.path.expanduser(path)).exists():
            raise ConfigError(f"{name}={path} does not exist")


def _local_paths(run: EvalRunConfig) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    if "ruler" in run.suite:
        r = run.suite["ruler"]
        out += [("suite.ruler.haystack", r.haystack), ("suite.ruler.squad", r.squad),
                ("suite.ruler.hotpotqa", r.hotpotqa)]
    if "longbench" in run.suite:
        out.append(("suite.longbench.data_dir", run.suite["longbench"].data_dir))
    if "short" in run.suite:
        out.append(("suite.short.data_dir", run.suite["short"].data_dir))
    return out


def model_name(run: EvalRunConfig) -> str:
    return run.model.name or Path(run.model.path).name


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalRunConfig)
