"""The one module that imports ``megatron.core``: process groups, model, DDP/optimizer/scheduler,
forward-backward step, distributed checkpoints and indexed/blended datasets.

Tested with megatron-core 0.16.1 and 0.19.2 (CPU, Python 3.11). Where releases differ, the code checks for the
feature (``_accepts``) rather than the version.
Without a CUDA device every call runs inside ``train.cpu_compat.cpu_device_scope`` (see there).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from train.config import DecayStyle
from train.convert import Shape

log = logging.getLogger(__name__)

try:  # TransformerEngine is optional: its fused layer spec when installed, megatron's local spec otherwise.
    import transformer_engine  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except ImportError:
    HAVE_TE = False

ON_CPU = not torch.cuda.is_available()


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


# ---------------------------------------------------------------------------------------------- processes
def init_distributed(tp: int, pp: int, cp: int, seed: int) -> tuple[int, int]:
    """Process group from torchrun's env (world size 1 without it) and megatron's parallel groups."""
    if not dist.is_initialized():
        if not ON_CPU:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "gloo" if ON_CPU else "nccl"
        if "WORLD_SIZE" in os.environ:  # torchrun / srun: rendezvous from the environment
            dist.init_process_group(backend)
        else:  # a single process: an in-memory store, no TCP port that could collide with another job
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tp, pp, context_parallel_size=cp)
    # The inference tracker forks no CUDA RNG state: dropout draws from torch's default (CPU) generator.
    seed_fn = tensor_parallel.model_parallel_cuda_manual_seed
    if ON_CPU and not _accepts(seed_fn, "inference_rng_tracker"):
        raise RuntimeError("this megatron-core has no inference_rng_tracker: the CPU path needs >= 0.14")
    seed_fn(seed, **({"inference_rng_tracker": True} if ON_CPU else {}))
    torch.manual_seed(seed)  # the CPU generator: model init and, on CPU, dropout (the same on every rank)
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def context_parallel_slice(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This context-parallel rank's chunks of the sequence (megatron's load-balanced split); identity at CP 1."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(batch)


def loss_group() -> Any:
    """Ranks whose losses average to the step's loss: data parallel and context parallel."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_group() -> Any:
    return parallel_state.get_tensor_model_parallel_group()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


# ------------------------------------------------------------------------------------------------- model
@dataclass
class ModelSpec:
    """Everything that fixes the GPTModel: the architecture (``Shape``) plus the rest of LLaMA-3."""

    shape: Shape
    hidden_size: int
    ffn_hidden_size: int
    rope_theta: float
    rms_norm_eps: float
    padded_vocab: int
    max_seq_length: int


def transformer_config(spec: ModelSpec, *, dropout: float, bf16: bool) -> TransformerConfig:
    """LLaMA-3 in megatron terms: RMSNorm, SwiGLU, GQA, no biases; fused CUDA kernels off on CPU."""
    s = spec.shape
    kwargs: dict[str, Any] = dict(
        num_layers=s.num_layers, hidden_size=spec.hidden_size, num_attention_heads=s.num_heads,
        num_query_groups=s.num_kv_heads, kv_channels=s.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.rms_norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=dropout, attention_dropout=dropout,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=parallel_state.get_tensor_model_parallel_world_size() > 1 and not ON_CPU,
        bf16=bf16 and not ON_CPU, params_dtype=torch.bfloat16 if bf16 and not ON_CPU else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 and not ON_CPU else torch.float32,
        use_cpu_initialization=ON_CPU, perform_initialization=True, init_method_std=0.02)
    if ON_CPU:  # fused kernels need CUDA
        kwargs |= dict(bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                       gradient_accumulation_fusion=False, persist_layer_norm=False)
    return TransformerConfig(**kwargs)


def build_model(spec: ModelSpec, config: TransformerConfig) -> GPTModel:
    if config.context_parallel_size > 1 and not uses_te_names():
        raise ValueError("parallel.context > 1 needs TransformerEngine on GPU (megatron's local attention has no CP)")
    layer_spec = (get_gpt_layer_with_transformer_engine_spec() if HAVE_TE and not ON_CPU
                  else get_gpt_layer_local_spec(normalization="RMSNorm"))
    model = GPTModel(config, layer_spec, vocab_size=spec.padded_vocab, max_sequence_length=spec.max_seq_length,
                     position_embedding_type="rope", rotary_base=int(spec.rope_theta),
                     share_embeddings_and_output_weights=False,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())
    if not ON_CPU:
        model.cuda(torch.cuda.current_device())
    return model


def uses_te_names() -> bool:
    return HAVE_TE and not ON_CPU


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of 128 * TP (the extra rows are never targets)."""
    m = divisible_by * tp
    return ((vocab + m - 1) // m) * m


def local_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters (DDP wrapper removed), detached on the CPU."""
    inner = model.module if hasattr(model, "module") else model
    return {k: v.detach().float().cpu() for k, v in inner.state_dict().items() if not k.endswith("_extra_state")}


def load_local_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    inner = model.module if hasattr(model, "module") else model
    missing, unexpected = inner.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")


# ------------------------------------------------------------------------------------- DDP and optimizer
@dataclass
class Optim:
    ddp: DistributedDataParallel
    optimizer: Any
    scheduler: OptimizerParamScheduler


def build_optimizer(model: GPTModel, config: TransformerConfig, sched: Any, *, steps: int,
                    distributed_optimizer: bool) -> Optim:
    """megatron DDP (grads reduced in fp32) + Adam (distributed when asked, on GPU) + LR scheduler."""
    dist_opt = distributed_optimizer and not ON_CPU  # DistributedOptimizer rejects CPU tensors (cpu_compat)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=dist_opt), model)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=sched.lr, min_lr=sched.min_lr, weight_decay=sched.weight_decay,
                              adam_beta1=sched.adam_beta1, adam_beta2=sched.adam_beta2, clip_grad=sched.clip_grad,
                              bf16=config.bf16, params_dtype=config.params_dtype,
                              use_distributed_optimizer=dist_opt)
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    warmup = int(round(sched.warmup_fraction * steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else sched.lr, max_lr=sched.lr, min_lr=sched.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=steps, lr_decay_style=DecayStyle(sched.decay).megatron,
        start_wd=sched.weight_decay, end_wd=sched.weight_decay, wd_incr_steps=steps, wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    return Optim(ddp, optimizer, scheduler)


def train_step(opt: Optim, forward_step: Callable, data_iterator: Iterator, *, num_microbatches: int,
               seq_length: int, micro_batch_size: int) -> tuple[list[dict], float | None, bool]:
    """One optimizer step through megatron's forward/backward schedule: (per-microbatch losses, grad norm, ok)."""
    opt.ddp.zero_grad_buffer()
    opt.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[opt.ddp],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False)
    ok, grad_norm, _ = opt.optimizer.step()
    if ok:
        opt.scheduler.step(increment=1)
    return losses, grad_norm, ok


def current_lr(opt: Optim) -> float:
    return float(opt.optimizer.param_groups[0]["lr"])


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, opt: Optim, common: dict[str, Any]) -> None:
    """Distributed checkpoint (model + optimizer, resharding-capable) and the scheduler/loop state."""
    model_sd = opt.ddp.module.sharded_state_dict()
    sd = {"model": model_sd, "optimizer": opt.optimizer.sharded_state_dict(model_sd),
          "scheduler": opt.scheduler.state_dict(), "common": common}
    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sd, str(path))


def load_checkpoint(path: Path, opt: Optim) -> dict[str, Any]:
    model_sd = opt.ddp.module.sharded_state_dict()
    template = {"model": model_sd, "optimizer": opt.optimizer.sharded_state_dict(model_sd, is_loading=True)}
    sd = dist_checkpointing.load(template, str(path))
    opt.ddp.module.load_state_dict(sd["model"])
    opt.optimizer.load_state_dict(sd["optimizer"])
    opt.scheduler.load_state_dict(sd["scheduler"])
    return sd["common"]


# ------------------------------------------------------------------------------------------------- data
class IndexedWriter:
    """Streams token lists into a megatron indexed dataset ``prefix.bin`` / ``prefix.idx``."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = str(prefix)
        dtype = np.uint16 if vocab_size < 65500 else np.int32
        self.builder = IndexedDatasetBuilder(self.prefix + ".bin", dtype=dtype)

    def add(self, tokens: list[int]) -> None:
        self.builder.add_document(torch.tensor(tokens, dtype=torch.int64), [len(tokens)])

    def finalize(self) -> None:
        self.builder.finalize(self.prefix + ".idx")


class _TokenizerInfo:
    """What GPTDataset reads from a tokenizer: the vocabulary size and the end-of-document id (no pad)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        # GPTDataset hashes its config, tokenizer included, into the names of its index caches.
        self.unique_identifiers = {"class": "TokenizerInfo", "vocab_size": vocab_size, "eod": eod}


def build_blended_dataset(prefixes: list[str], weights: list[float], *, num_samples: int, seq_length: int,
                          seed: int, vocab_size: int, eod: int, cache_dir: Path) -> Any:
    """megatron's BlendedMegatronDatasetBuilder over GPTDatasets: a fixed, seeded order of ``num_samples``.

    Explicit causal masks only on CPU (the local attention needs one there); at 32k a [L, L] mask per sample
    would cost 1 GB, and on GPU the attention kernels apply causality themselves.
    """
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split="100,0,0",
        path_to_cache=str(cache_dir), tokenizer=_TokenizerInfo(vocab_size, eod),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=ON_CPU, mid_level_dataset_surplus=0.05)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, cfg).build()
    return train
