"""lm-evaluation-harness as the engine: its backends run the model, its task files hold the short suites.

With eval/ruler.py (lm-eval's RULER generators), the only module that imports lm-eval. The project adds the
prepared data, the reference prompts and scores (eval/tasks/hooks.py) and the per-sample files around it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eval.sources import MissingDataError

log = logging.getLogger(__name__)


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def short_task_file(name: str, subject: str | None = None) -> Path:
    """lm-eval's task file of a short suite (MMLU per subject)."""
    base = lm_eval_tasks_dir()
    if name == "mmlu":
        return base / "mmlu" / "default" / f"mmlu_{subject}.yaml"
    return base / name / f"{name}.yaml"


def warm_hub_tasks(names: list[str], prepare_cmd: str) -> None:
    """Load lm-eval's hub tasks once so the datasets cache holds them for offline jobs."""
    from lm_eval.tasks import TaskManager

    with hub_errors(names, prepare_cmd):
        TaskManager().load(names)


@contextlib.contextmanager
def hub_errors(names: list[str], prepare_cmd: str) -> Iterator[None]:
    """A hub dataset that cannot be fetched (offline, cold cache) becomes a ``MissingDataError`` naming the
    tasks and the command that fetches them, instead of the datasets library's connection error."""
    try:
        yield
    except OSError as e:  # datasets and huggingface_hub raise OSError subclasses (ConnectionError...)
        if not names:
            raise
        raise MissingDataError(f"lm-eval's hub datasets of {sorted(names)} are not in the datasets cache (HF_HOME) "
                               f"and cannot be fetched here: {type(e).__name__}: {e}. Fetch them on a node with "
                               f"internet:\n  {prepare_cmd}") from e


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
        # The backend's room for the longest prompt (eval/run.py) may exceed the checkpoint's positions by a
        # few tokens; vllm refuses that unless told, hf simply runs RoPE a few positions further.
        os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    return get_model(ev.backend).create_from_arg_obj(model_args(ev.backend, model, ev),
                                                     {"batch_size": ev.batch_size, "device": device})


def task_manager(task_dir: Path, builtin: bool) -> Any:
    """lm-eval's task index: the run's task files, and lm-eval's own only when a built-in task is run
    (indexing those takes ~20 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=builtin)


def evaluate(lm: Any, tasks: list[str], manager: Any, out_dir: Path, ev: Any, num_fewshot: int | None = None,
             hub_tasks: list[str] = (), prepare_cmd: str = "") -> dict[str, Any]:
    """Run lm-eval on task names; write its outputs under ``out_dir/lm_eval``. The result keeps the
    per-sample records under ``samples`` (with ``eval.log_samples``)."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(out_dir / "lm_eval"))
    with hub_errors(list(hub_tasks), prepare_cmd):
        res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot,
                              limit=ev.limit, log_samples=ev.log_samples, evaluation_tracker=tracker,
                              random_seed=ev.seed, numpy_random_seed=ev.seed, torch_random_seed=ev.seed,
                              fewshot_random_seed=ev.seed, confirm_run_unsafe_code=True)
    if res is None:  # not rank 0 under accelerate
        return {}
    samples = res.pop("samples", None) if ev.log_samples else None
    tracker.save_results_aggregated(results=res, samples=samples)
    for name, rows in (samples or {}).items():
        tracker.save_results_samples(task_name=name, samples=rows)
    return {**res, "samples": samples or {}}
