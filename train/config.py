"""Typed config schemas of the training stage (``longattn-train``), registered with Hydra's ConfigStore.

YAML under ``conf/`` only sets values; every field is documented here. ``validate`` checks and derives
everything (DP size, global batch, steps from a token budget) before any side effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from longattn.common.errors import Choice, ConfigError
from longattn.common.models import ModelConfig, ModelSource
from longattn.common.tracking import WandbConfig

# Paper Table 7 (percent of training tokens): short-context sources and the three selected long categories.
PAPER_MIX = {"wiki": 3.0, "github": 3.0, "web": 4.0, "arxiv": 30.0, "book": 30.0, "code": 30.0}


class DecayStyle(Choice):
    """Decay styles of megatron's OptimizerParamScheduler (``inverse_square_root`` is its ``inverse-square-root``)."""

    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    WSD = "WSD"
    inverse_square_root = "inverse_square_root"

    @property
    def megatron(self) -> str:
        return self.value.replace("_", "-")


class LauncherName(Choice):
    local = "local"
    """This process, or torchrun with ``nproc_per_node`` > 1."""
    slurm = "slurm"
    """Write (and optionally submit) an sbatch script."""


@dataclass
class DataMixConfig:
    selected: str | None = None
    """Run directory of ``longattn-select`` (its ``selected.jsonl``); windows are split by their ``category``."""
    short: dict[str, str | None] = field(default_factory=lambda: {"wiki": None, "github": None, "web": None})
    """Short-context sources, name -> JSON Lines path; null = absent (paper: wiki = Dolma Wikipedia,
    github = Pile GitHub, web = RefinedWeb). Other names need ``+data.short.NAME=PATH`` and a weight."""
    weights: dict[str, float] = field(default_factory=lambda: dict(PAPER_MIX))
    """Blend weight per source (Table 7); renormalised over the sources present (the log says so)."""
    text_key: str = "content"
    """Record field with the text (``text`` is accepted when this one is absent)."""
    workers: int = 2
    """Tokeniser processes when building the indexed datasets (0 = in this process)."""
    cache_dir: str | None = None
    """Where the .bin/.idx files and dataset index caches go; null = ``out_dir/data``."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (paper: 8)."""
    pipeline: int = 1
    """Pipeline-parallel size (paper: 1)."""
    context: int = 1
    """Context-parallel size (paper: 1)."""
    data: int | None = None
    """Derived: world size / (tensor * pipeline * context). Leave null."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's DistributedOptimizer; CUDA only)."""


@dataclass
class ScheduleConfig:
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    decay: DecayStyle = DecayStyle.cosine
    """Decay style of megatron's OptimizerParamScheduler."""
    warmup_fraction: float = 0.01
    """Warm-up steps as a fraction of the run (the paper does not state it)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value."""


@dataclass
class TrainConfig:
    tokens: float | None = None
    """Token budget (accepts 5e9): steps = ceil(tokens / (global_batch * seq_length)). Overrides ``steps``."""
    steps: int | None = None
    """Number of optimizer steps when ``tokens`` is null."""
    seq_length: int = 32768
    """Training sequence length (paper: 32768)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank (paper: 1)."""
    grad_accum: int = 8
    """Micro-batches per step per data-parallel rank (paper: 8)."""
    global_batch_size: int | None = None
    """Derived: micro_batch_size * grad_accum * parallel.data. Leave null."""
    dropout: float = 0.1
    """Hidden and attention dropout (paper: 0.1)."""
    bf16: bool = True
    """bf16 weights with fp32 master weights (paper); the CPU debugging path always trains in fp32."""
    seed: int = 1234
    """Seed of the model init (random models), dropout and the data order."""
    save_every: int = 1000
    """Steps between checkpoints (one is always written at the end)."""
    log_every: int = 1
    """Steps between progress lines (metrics.jsonl gets every step)."""
    export_hf: bool = True
    """Export the final model to ``out_dir/hf`` (transformers + tokenizer)."""
    peak_tflops: float = 989.0
    """Peak dense bf16 TFLOP/s per device for MFU (H100/H800 SXM: 989)."""
    max_steps_this_run: int | None = None
    """Stop after this many steps in this invocation (to test resume; the schedule still spans ``steps``)."""


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.local
    """``local`` (this process, or torchrun with ``nproc_per_node`` > 1) or ``slurm`` (writes an sbatch script)."""
    nodes: int = 1
    """Nodes (slurm)."""
    nproc_per_node: int = 1
    """Processes (GPUs) per node."""
    gpus_per_node: int | None = None
    """GPUs requested from SLURM per node; null = nproc_per_node, 0 = none (a CPU cluster)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    time: str = "48:00:00"
    """SLURM time limit."""
    submit: bool = False
    """Run ``sbatch`` on the generated script (otherwise only write it and print the command)."""
    master_port: int = 29500
    """Rendezvous port of torchrun on the first SLURM node (local runs pick a free port)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables exported in the sbatch script (NCCL settings...)."""


@dataclass
class TrainRunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataMixConfig = field(default_factory=DataMixConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    out_dir: str = MISSING
    """Run directory: metrics.jsonl, checkpoints/, hf/; rerunning with the same out_dir resumes."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form tags (experiment name...)."""


def short_sources(cfg: DataMixConfig) -> dict[str, str]:
    """The short-context sources given a path (null entries are absent sources)."""
    return {k: v for k, v in cfg.short.items() if v}


def validate_static(cfg: TrainRunConfig) -> None:
    """Checks that need no process group (run before launching anything); errors name the key."""
    t, m = cfg.train, cfg.model
    if t.tokens is None and t.steps is None:
        raise ConfigError("set train.tokens=T (e.g. 5e9) or train.steps=N")
    if t.tokens is not None and float(t.tokens) <= 0:
        raise ConfigError(f"train.tokens={t.tokens} must be positive")
    if t.tokens is None and t.steps is not None and t.steps < 1:
        raise ConfigError(f"train.steps={t.steps} must be >= 1")
    if not cfg.data.selected and not short_sources(cfg.data):
        raise ConfigError("no data: set data.selected=DIR (a longattn-select out_dir) and/or data.short={...}")
    if m.source == ModelSource.gguf:
        raise ConfigError(f"model.source={m.source}: training takes hf (model.path=DIR) or random models")
    if m.source == ModelSource.hf and not m.path:
        raise ConfigError(f"model={m.name} needs model.path=/path/to/hf/model/dir")
    if m.source == ModelSource.random and not m.tokenizer:
        raise ConfigError(f"model={m.name} (random) needs model.tokenizer=DIR_OR_GGUF")
    if t.seq_length < 8:
        raise ConfigError(f"train.seq_length={t.seq_length} is too small")
    if t.micro_batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.micro_batch_size and train.grad_accum must be >= 1")
    if not 0.0 <= t.dropout < 1.0:
        raise ConfigError(f"train.dropout={t.dropout} must be in [0, 1)")
    if cfg.parallel.pipeline != 1:
        # HF weight loading/export map global layer numbers onto one stage; the paper trains with PP 1.
        raise ConfigError(f"parallel.pipeline={cfg.parallel.pipeline}: only 1 is supported (the paper uses PP 1)")
    for name in short_sources(cfg.data):
        if name not in cfg.data.weights:
            raise ConfigError(f"data.short.{name} has no blend weight: set data.weights.{name}=W")


def derive(cfg: TrainRunConfig, world_size: int) -> None:
    """Fill parallel.data, train.global_batch_size and train.steps for ``world_size`` processes."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor*pipeline*context "
                          f"= {model_parallel}")
    p.data = world_size // model_parallel
    if cfg.model.source == ModelSource.random and cfg.model.num_key_value_heads % p.tensor:
        raise ConfigError(f"parallel.tensor={p.tensor} must divide model.num_key_value_heads "
                          f"({cfg.model.num_key_value_heads}): megatron splits whole query groups")
    if t.seq_length % (2 * p.context) and p.context > 1:
        raise ConfigError(f"train.seq_length={t.seq_length} must be divisible by 2 * parallel.context")
    t.global_batch_size = t.micro_batch_size * t.grad_accum * p.data
    if t.tokens is not None:
        t.steps = max(1, math.ceil(float(t.tokens) / (t.global_batch_size * t.seq_length)))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
