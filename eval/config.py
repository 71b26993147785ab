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

from eval.longbench_prompts import MAX_GEN
from eval.suites import (
    LONGBENCH_BUDGET_32K,
    LONGBENCH_TASKS,
    RULER_TASKS,
    SHORT_TASKS,
    SUITES,
    reference_name,
)
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
    """Context the model is evaluated at (lm-eval's ``max_length``); the backend gets more when a prepared
    prompt plus its generation needs it, so it never truncates a prompt."""
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
    """Write per-sample outputs: out_dir/samples/<task>.jsonl (prompt, prediction, references, score) and
    lm-eval's own samples_*.jsonl under out_dir/lm_eval/."""
    cache_dir: str = "${oc.env:LONGATTN_EVAL_CACHE,${oc.env:HOME}/.cache/longattn/eval}"
    """Fetched sources and prepared data (RULER samples, LongBench prompts), each file keyed by what made it."""
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
    max_prompt_tokens: int = LONGBENCH_BUDGET_32K
    """Middle-truncation budget in tokens, counted as the reference does (the tokenizer's defaults, BOS
    included); 31500 = the reference's ``model2maxlen`` for its 32k models. With the longest generation
    (512 tokens) it must fit in model.max_length."""


@dataclass
class ShortSuiteConfig:
    data_dir: str | None = None
    """Directory of local files (``mmlu/<subject>.jsonl``, ``hellaswag.jsonl``, ``openbookqa.jsonl``,
    ``humaneval.jsonl``) in the hub datasets' formats; null = lm-eval's hub datasets."""
    num_fewshot: dict[str, int] = field(default_factory=dict)
    """Few-shot examples per task (e.g. mmlu: 5); absent = lm-eval's default, 0 for all four (the paper
    states none; docs/eval.md)."""
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


_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def _check_model_dir(run: EvalRunConfig) -> None:
    """model.path must be an HF model directory (config and weights), and the tokenizer directory must hold
    a tokenizer, before anything loads: an empty directory otherwise fails deep in transformers."""
    path = Path(os.path.expanduser(run.model.path))
    if not path.is_dir():
        raise ConfigError(f"model.path={run.model.path} is not a directory (an HF model directory)")
    if not run.eval.prepare_only:
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={run.model.path} has no config.json: not an HF model directory")
        if not any(next(path.glob(g), None) for g in _WEIGHTS):
            raise ConfigError(f"model.path={run.model.path} has no weights (*.safetensors or *.bin)")
    tok = Path(os.path.expanduser(run.model.tokenizer or run.model.path))
    key = "model.tokenizer" if run.model.tokenizer else "model.path"
    if not tok.is_dir() or not any((tok / f).is_file() for f in _TOKENIZER_FILES):
        raise ConfigError(f"{key}={tok} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}...): "
                          "prompts are sized and counted with it")


def _check_backend(run: EvalRunConfig) -> None:
    ev = run.eval
    if ev.backend != "vllm" or ev.prepare_only:
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("eval.backend=vllm but vllm is not installed: pip install 'lm-eval[vllm]' "
                          "(GPU nodes), or use eval.backend=hf")
    if ev.data_parallel_size > 1 and importlib.util.find_spec("ray") is None:
        raise ConfigError(f"eval.data_parallel_size={ev.data_parallel_size} with eval.backend=vllm needs ray "
                          "(lm-eval runs vllm replicas as ray actors): pip install ray, or set "
                          "eval.data_parallel_size=1")


def _check_longbench(run: EvalRunConfig) -> None:
    cfg, tasks = run.suite["longbench"], selected_tasks(run, "longbench")
    if cfg.max_prompt_tokens < 1:
        raise ConfigError(f"suite.longbench.max_prompt_tokens={cfg.max_prompt_tokens} must be >= 1")
    longest = max((MAX_GEN[t] for t in tasks), default=0)
    if tasks and cfg.max_prompt_tokens + longest > run.model.max_length:
        raise ConfigError(f"suite.longbench.max_prompt_tokens={cfg.max_prompt_tokens} plus the longest generation "
                          f"({longest} tokens) exceeds model.max_length={run.model.max_length}: lower the budget "
                          "(the reference uses about model.max_length - 500)")
    if cfg.data_dir:
        missing = [t for t in tasks if not (Path(os.path.expanduser(cfg.data_dir)) / f"{t}.jsonl").is_file()]
        if missing:
            raise ConfigError(f"suite.longbench.data_dir={cfg.data_dir} has no {missing[0]}.jsonl "
                              f"(missing: {missing}); or leave those tasks out of eval.tasks")


def validate(run: EvalRunConfig) -> None:
    """Check before any side effect; errors name the key to change."""
    if not run.suite:
        raise ConfigError("no suite selected: set suite=ruler (or [ruler,longbench,short])")
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
    if run.eval.limit is not None and run.eval.limit < 1:
        raise ConfigError(f"eval.limit={run.eval.limit} must be >= 1 (or null for all)")
    if "ruler" in run.suite and run.suite["ruler"].num_samples < 1:
        raise ConfigError("suite.ruler.num_samples must be >= 1")
    for name, path in _local_paths(run):
        if path and not Path(os.path.expanduser(path)).exists():
            raise ConfigError(f"{name}={path} does not exist")
    if "longbench" in run.suite:
        _check_longbench(run)
    _check_backend(run)
    _check_model_dir(run)


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
