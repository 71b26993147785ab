"""Typed config schemas of the training stage (``longattn-train``), registered with Hydra's ConfigStore.

YAML under ``conf/`` only sets values; every field is documented here. Checks run before any side effect:
``validate_static`` (the values alone), ``validate_inputs`` (the files they name) and ``validate_environment``
(W&B credentials, TransformerEngine on CUDA); ``derive`` fills DP size, global batch and steps.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import netrc
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from longattn.common.errors import Choice, ConfigError, choices
from longattn.common.models import ModelConfig, ModelSource
from longattn.common.tracking import WandbConfig

log = logging.getLogger(__name__)

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


class BosMode(Choice):
    prepend = "prepend"
    """Every long sample and every short document starts with the tokenizer's BOS (LLaMA-3 pre-training does)."""
    none = "none"
    """No BOS: a long sample is the window's tokens alone (its last position then has no target)."""


class TransformerImpl(Choice):
    auto = "auto"
    """TransformerEngine's layer spec on CUDA, megatron's local spec on the CPU."""
    transformer_engine = "transformer_engine"
    """TransformerEngine's fused layers and attention (needs the ``gpu`` extra)."""
    local = "local"
    """megatron's local spec: plain PyTorch attention that materialises the full score matrix."""


class Recompute(Choice):
    none = "none"
    """Keep all activations (megatron's default)."""
    selective = "selective"
    """Recompute the core attention in the backward pass (megatron's ``selective``)."""
    full = "full"
    """Recompute whole layers (``train.recompute_layers`` per chunk, megatron's ``uniform`` method)."""


@dataclass
class PrepareConfig:
    rank: int = 0
    """This preparation process's rank among ``world_size`` (a CPU SLURM array element: its index)."""
    world_size: int = 1
    """Processes that share the tokenising (units are dealt round-robin); the last to finish merges."""
    unit_records: int = 1024
    """Records (selected windows or short documents) per unit of work; units are resumable."""
    short_margin: float = 0.1
    """Short sources are tokenised up to what the mix needs times (1 + short_margin), not in full."""
    in_run: bool | None = None
    """Let a training run tokenise what is missing; null = only without CUDA (GPU nodes never tokenise)."""


@dataclass
class DataMixConfig:
    selected: str | None = None
    """Run directory of ``longattn-select`` (its ``selected.jsonl``); windows are split by their ``category``."""
    short: dict[str, str | None] = field(default_factory=lambda: {"wiki": None, "github": None, "web": None})
    """Short-context sources, name -> JSON Lines path; null = absent (paper: wiki = Dolma Wikipedia,
    github = Pile GitHub, web = RefinedWeb). Other names need ``+data.short.NAME=PATH`` and a weight."""
    weights: dict[str, float] = field(default_factory=lambda: dict(PAPER_MIX))
    """Blend weight per source (Table 7), a share of samples; renormalised over the sources present."""
    text_key: str = "content"
    """Record field with the text (``text`` is accepted when this one is absent)."""
    bos: BosMode = BosMode.prepend
    """BOS handling: ``prepend`` (LLaMA-3 style: [BOS] + window; [BOS] doc [EOS] for short data) or ``none``."""
    workers: int = 2
    """Tokeniser processes of one preparation process (0 = in this process)."""
    cache_dir: str | None = None
    """Where prepared data (units, merged .bin/.idx, index caches) goes; null = ``out_dir/data``."""
    preview: int = 32
    """Samples described in ``data/samples_preview.jsonl`` (source, data ids, tokens)."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """How the data is prepared (sharding over processes, units, short-source margin)."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (paper: 8)."""
    pipeline: int = 1
    """Pipeline-parallel size (paper: 1)."""
    context: int = 1
    """Context-parallel size (paper: 1); needs TransformerEngine."""
    data: int | None = None
    """Derived: world size / (tensor * pipeline * context). Leave null."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (megatron's DistributedOptimizer; CUDA only)."""
    sequence_parallel: bool = True
    """Sequence parallelism with TP > 1 on CUDA (layer norms and dropout split over the sequence)."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduce with the backward pass (reduced after the last micro-batch)."""
    overlap_param_gather: bool = True
    """Overlap the distributed optimizer's parameter all-gather with the next forward (CUDA only)."""


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
    adam_eps: float = 1e-8
    """AdamW epsilon (megatron's default)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value."""


@dataclass
class TrainConfig:
    tokens: float | None = None
    """Token budget (accepts 5e9): steps = ceil(tokens / (global_batch * seq_length)). Overrides ``steps``."""
    steps: int | None = None
    """Number of optimizer steps when ``tokens`` is null."""
    seq_length: int = 32768
    """Training sequence length = the selection's window length (paper: 32768): one window, one sample."""
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
    transformer_impl: TransformerImpl = TransformerImpl.auto
    """Layer implementation: ``auto`` (TransformerEngine on CUDA), ``transformer_engine`` or ``local``."""
    recompute: Recompute = Recompute.none
    """Activation recomputation: ``none``, ``selective`` (core attention) or ``full`` (whole layers)."""
    recompute_layers: int = 1
    """With ``recompute=full``: layers per recomputed chunk (megatron's recompute_num_layers, uniform)."""
    fusions: bool = True
    """Fused kernels on CUDA (bias-SwiGLU, bias-dropout-add, RoPE, grad-accumulation, cross-entropy)."""
    seed: int = 1234
    """Seed of the model init (random models), dropout and the data order."""
    save_every: int = 1000
    """Steps between checkpoints (one is always written at the end)."""
    log_every: int = 1
    """Steps between progress lines (metrics.jsonl gets every step)."""
    export_hf: bool = True
    """Export the final checkpoint to ``out_dir/hf`` (transformers + tokenizer) on one rank at the end."""
    peak_tflops: float = 989.0
    """Peak dense bf16 TFLOP/s per device for MFU (H100/H800 SXM: 989)."""
    max_steps_this_run: int | None = None
    """Stop after this many steps in this invocation (to test resume; the schedule still spans ``steps``)."""
    prepare_only: bool = False
    """Only prepare the data (tokenise, index, preview) and exit: a CPU job, shardable with data.prepare."""


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
    cpus_per_task: int | None = 64
    """CPU cores for the one task per node (torchrun and its workers); null = SLURM's default."""
    mem: str | None = "0"
    """Memory per node (sbatch --mem); "0" = all of the node's memory, null = SLURM's default."""
    exclusive: bool = True
    """Whole nodes (sbatch --exclusive): no other job shares the GPUs' node."""
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
    """Run directory: metrics.jsonl, checkpoints/, hf/, data/; rerunning with the same out_dir resumes."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form tags (experiment name...)."""


def short_sources(cfg: DataMixConfig) -> dict[str, str]:
    """The short-context sources given a path (null entries are absent sources)."""
    return {k: v for k, v in cfg.short.items() if v}


def data_dir(cfg: TrainRunConfig) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.out_dir) / "data")


# ------------------------------------------------------------------------------------------- validation
def validate_static(cfg: TrainRunConfig) -> None:
    """Checks of the values alone (no file system, no environment); errors name the key."""
    t, m, d = cfg.train, cfg.model, cfg.data
    if t.tokens is None and t.steps is None:
        raise ConfigError("set train.tokens=T (e.g. 5e9) or train.steps=N")
    if t.tokens is not None and float(t.tokens) <= 0:
        raise ConfigError(f"train.tokens={t.tokens} must be positive")
    if t.tokens is None and t.steps is not None and t.steps < 1:
        raise ConfigError(f"train.steps={t.steps} must be >= 1")
    if not d.selected and not short_sources(d):
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
    if t.recompute == Recompute.full and t.recompute_layers < 1:
        raise ConfigError(f"train.recompute_layers={t.recompute_layers} must be >= 1")
    if cfg.parallel.pipeline != 1:
        # HF weight loading/export map global layer numbers onto one stage; the paper trains with PP 1.
        raise ConfigError(f"parallel.pipeline={cfg.parallel.pipeline}: only 1 is supported (the paper uses PP 1)")
    if cfg.parallel.context > 1 and t.transformer_impl == TransformerImpl.local:
        raise ConfigError(f"parallel.context={cfg.parallel.context} needs TransformerEngine: megatron's local "
                          "attention has no context parallelism (train.transformer_impl=local)")
    for name in short_sources(d):
        if name not in d.weights:
            raise ConfigError(f"data.short.{name} has no blend weight: set data.weights.{name}=W")
    p = d.prepare
    if not 0 <= p.rank < p.world_size:
        raise ConfigError(f"data.prepare.rank={p.rank} must be in [0, data.prepare.world_size={p.world_size})")
    if p.unit_records < 1 or p.short_margin < 0 or d.preview < 0 or d.workers < 0:
        raise ConfigError("data.prepare.unit_records >= 1, data.prepare.short_margin >= 0, data.preview >= 0 "
                          "and data.workers >= 0 are required")


def selection_window_length(selected: str | Path) -> int | None:
    """``window.length`` of a longattn-select run (its saved config.yaml); None when it has none."""
    conf = Path(selected) / "config.yaml"
    if not conf.is_file():
        return None
    from omegaconf import OmegaConf

    length = OmegaConf.select(OmegaConf.load(conf), "window.length", default=None)
    return int(length) if length is not None else None


def validate_inputs(cfg: TrainRunConfig) -> None:
    """Checks of the files the config names: the selection, short sources and the model directory."""
    d = cfg.data
    if d.selected:
        sel = Path(d.selected) / "selected.jsonl"
        if not sel.is_file():
            raise ConfigError(f"data.selected={d.selected}: no selected.jsonl there (a longattn-select out_dir "
                              "holds one once its merge has run)")
        if not _has_a_record(sel):
            raise ConfigError(f"data.selected={d.selected}: selected.jsonl is empty, the selection kept nothing "
                              "(see its metrics.json); select with a larger budget or drop data.selected")
        w = selection_window_length(d.selected)
        if w is not None and w != cfg.train.seq_length:
            raise ConfigError(f"train.seq_length={cfg.train.seq_length} but data.selected={d.selected} holds "
                              f"windows of window.length={w}: one window is one sample, set train.seq_length={w}")
    for name, path in short_sources(d).items():
        if not Path(path).is_file():
            raise ConfigError(f"data.short.{name}={path}: no such file")
    m = cfg.model
    if m.source == ModelSource.hf and not (Path(m.path) / "config.json").is_file():
        raise ConfigError(f"model.path={m.path}: not a HF model directory (no config.json)")


def _has_a_record(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def wandb_credentials(env: dict[str, str] | None = None) -> str | None:
    """Where W&B would find an API key (env var or netrc), or None; offline/disabled modes need none."""
    env = dict(os.environ) if env is None else env
    if env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={env['WANDB_MODE']}"
    if env.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(env.get("NETRC") or Path(env.get("HOME", Path.home())) / ".netrc")
    try:
        if path.is_file() and netrc.netrc(str(path)).authenticators(host):
            return str(path)
    except (netrc.NetrcParseError, OSError):
        return None
    return None


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def local_attention_gib(cfg: TrainRunConfig, num_heads: int) -> float:
    """Memory of one layer's attention scores in megatron's local spec (fp32 scores and softmax, per micro-batch)."""
    s = cfg.train.seq_length // max(cfg.parallel.context, 1)
    heads = max(num_heads // cfg.parallel.tensor, 1)
    return 2 * 4 * cfg.train.micro_batch_size * heads * s * s / 2**30


def validate_environment(cfg: TrainRunConfig, *, env: dict[str, str] | None = None, gpus: int | None = None,
                         have_te: bool | None = None) -> None:
    """W&B credentials, the launcher and the layer implementation on this machine (``gpus`` CUDA devices,
    None = count them); call before any side effect."""
    import torch

    if cfg.wandb.enabled and not cfg.train.prepare_only:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("wandb.enabled=true but wandb is not installed: pip install 'longattn[wandb]'")
        if wandb_credentials(env) is None:
            raise ConfigError("wandb.enabled=true but no W&B API key (WANDB_API_KEY, or `wandb login`'s netrc) "
                              "and WANDB_MODE is not offline: set one of them, or wandb.enabled=false")
    lc = cfg.launcher
    if lc.name == LauncherName.slurm and lc.submit and shutil.which("sbatch") is None:
        raise ConfigError("launcher.submit=true but sbatch is not on PATH: run on a SLURM login node, or set "
                          "launcher.submit=false to only write the scripts")
    gpus = torch.cuda.device_count() if gpus is None else gpus
    cuda = gpus > 0
    if cuda and lc.name == LauncherName.local and lc.nproc_per_node > gpus:
        raise ConfigError(f"launcher.nproc_per_node={lc.nproc_per_node} but this node has {gpus} GPUs")
    have_te = te_available() if have_te is None else have_te
    impl = cfg.train.transformer_impl
    if not cuda:
        return
    if impl != TransformerImpl.local and not have_te:
        raise ConfigError(f"train.transformer_impl={impl} on CUDA needs TransformerEngine: pip install "
                          "'longattn[gpu]' (see docs/train.md), or set train.transformer_impl=local (plain "
                          "PyTorch attention, out of memory at 32k)")
    if impl == TransformerImpl.local:
        heads = cfg.model.num_attention_heads if cfg.model.source == ModelSource.random else 32
        log.warning("train.transformer_impl=local on CUDA: attention materialises [seq x seq] scores, about "
                    "%.1f GiB per layer per micro-batch at train.seq_length=%d (%s)", local_attention_gib(cfg, heads),
                    cfg.train.seq_length, choices(TransformerImpl))


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


def launch_world_size(cfg: TrainRunConfig) -> int:
    """Processes the training launch will start (what data preparation sizes the global batch for)."""
    return cfg.launcher.nodes * cfg.launcher.nproc_per_node


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
