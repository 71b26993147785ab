"""The module that imports megatron-core's model side: process groups, model, DDP/optimizer/scheduler, the
forward-backward step, batches as model inputs, RNG state and distributed checkpoints (datasets:
``train.samples``).

Written against megatron-core 0.16 (the floor in pyproject: ``get_thd_batch_on_this_cp_rank`` and the
arguments passed here exist from 0.16.0 on). Without a CUDA device every call runs inside
``train.cpu_compat.cpu_device_scope`` (see there). GPU settings follow Megatron-LM's own recipes: bf16,
the distributed optimizer, sequence parallelism with TP, grad-reduce / param-gather overlap, and the
fused kernels (bias-SwiGLU, bias-dropout-add, RoPE, grad-accumulation, cross-entropy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from train import batches
from train.config import DecayStyle, ParallelConfig, Recompute, TrainConfig, TransformerImpl, te_available
from train.convert import Shape

log = logging.getLogger(__name__)

ON_CPU = not torch.cuda.is_available()


def uses_te(impl: TransformerImpl) -> bool:
    """TransformerEngine's layer spec: on CUDA unless ``local`` was asked for (validated before the run)."""
    return not ON_CPU and impl != TransformerImpl.local and te_available()


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
    # CPU: the inference tracker forks no CUDA RNG state, dropout draws from torch's default generator.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, **({"inference_rng_tracker": True} if ON_CPU else {}))
    torch.manual_seed(seed)  # the CPU generator: model init and, on CPU, dropout (the same on every rank)
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def loss_group() -> Any:
    """Ranks whose losses average to the step's loss: data parallel and context parallel."""
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def cp_group() -> Any:
    return parallel_state.get_context_parallel_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


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


def _fusions(te: bool) -> dict[str, Any]:
    """Fused kernels on CUDA as Megatron-LM's LLaMA recipes use them; the local spec gets the ones that need
    no TransformerEngine or APEX (bias-SwiGLU, bias-dropout-add: torch.jit; megatron's own fused CE)."""
    from megatron.core.extensions import transformer_engine as mte

    te_ce = te and getattr(mte, "te_parallel_cross_entropy", None) is not None
    return dict(bias_activation_fusion=True, bias_dropout_fusion=True, apply_rope_fusion=te,
                gradient_accumulation_fusion=te, masked_softmax_fusion=te, cross_entropy_loss_fusion=True,
                cross_entropy_fusion_impl="te" if te_ce else "native")


def _recompute(train: TrainConfig) -> dict[str, Any]:
    if train.recompute == Recompute.selective:
        return dict(recompute_granularity="selective")  # megatron's default module: core_attn
    if train.recompute == Recompute.full:
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=train.recompute_layers)
    return {}


def transformer_config(spec: ModelSpec, train: TrainConfig, parallel: ParallelConfig) -> TransformerConfig:
    """LLaMA-3 in megatron terms: RMSNorm, SwiGLU, GQA, no biases; bf16, fusions and overlaps on CUDA."""
    s, te = spec.shape, uses_te(train.transformer_impl)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    bf16 = train.bf16 and not ON_CPU
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs: dict[str, Any] = dict(
        num_layers=s.num_layers, hidden_size=spec.hidden_size, num_attention_heads=s.num_heads,
        num_query_groups=s.num_kv_heads, kv_channels=s.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.rms_norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=False,
        hidden_dropout=train.dropout, attention_dropout=train.dropout,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        sequence_parallel=parallel.sequence_parallel and tp > 1 and not ON_CPU,  # gloo has no reduce-scatter
        bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=ON_CPU, perform_initialization=True, init_method_std=0.02, **_recompute(train))
    if ON_CPU or not train.fusions:  # fused kernels need CUDA
        kwargs |= dict(bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                       masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
                       cross_entropy_loss_fusion=False)
    else:
        kwargs |= _fusions(te)
    return TransformerConfig(**kwargs)


def build_model(spec: ModelSpec, config: TransformerConfig, te: bool) -> GPTModel:
    if config.context_parallel_size > 1 and not te:
        raise ValueError("parallel.context > 1 needs TransformerEngine on GPU (megatron's local attention has no CP)")
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    model = GPTModel(config, layer_spec, vocab_size=spec.padded_vocab, max_sequence_length=spec.max_seq_length,
                     position_embedding_type="rope", rotary_base=int(spec.rope_theta),
                     share_embeddings_and_output_weights=False,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())
    if not ON_CPU:
        model.cuda(torch.cuda.current_device())
    return model


def padded_vocab_size(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of 128 * TP (the extra rows are never targets)."""
    m = divisible_by * tp
    return ((vocab + m - 1) // m) * m


def load_local_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    inner = model.module if hasattr(model, "module") else model
    missing, unexpected = inner.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")


# ------------------------------------------------------------------------------------------------ batches
def model_inputs(batch: dict[str, torch.Tensor], te: bool) -> dict[str, Any]:
    """A batch of samples as GPTModel inputs, documents kept apart (``train.batches``):
    - local spec (CPU): an explicit causal per-document mask (RoPE is relative, so with the mask a document's
      offset inside the sample changes nothing);
    - TransformerEngine: single-document samples (the windows) use the causal kernel, split over context-
      parallel ranks by megatron; packed samples are flattened to ``thd`` with ``cu_seqlens`` at the
      documents, which also restarts RoPE per document."""
    cp = parallel_state.get_context_parallel_world_size()
    if not te:
        return batch | {"attention_mask": batches.causal_document_mask(batch["position_ids"]),
                        "packed_seq_params": None}
    if not batches.is_packed(batch["position_ids"]):
        if cp > 1:
            from megatron.core.utils import get_batch_on_this_cp_rank

            batch = get_batch_on_this_cp_rank(batch)
        return batch | {"attention_mask": None, "packed_seq_params": None}
    flat = {k: v.reshape(1, -1) for k, v in batch.items()}
    if cp == 1:
        cu, longest = batches.cu_seqlens(flat["position_ids"])
        cu = cu.to(flat["tokens"].device)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                 max_seqlen_kv=longest)
        return flat | {"attention_mask": None, "packed_seq_params": params}
    from megatron.core.utils import get_thd_batch_on_this_cp_rank

    flat, cu, cu_padded = batches.pad_documents_for_cp(flat, 2 * cp)
    device = flat["tokens"].device
    longest = (cu_padded[1:] - cu_padded[:-1]).max().reshape(1)
    flat, params = get_thd_batch_on_this_cp_rank(flat, cu.to(device), cu_padded.to(device), longest)
    return flat | {"attention_mask": None, "packed_seq_params": params}


# ------------------------------------------------------------------------------------- DDP and optimizer
@dataclass
class Optim:
    ddp: DistributedDataParallel
    optimizer: Any
    scheduler: OptimizerParamScheduler


def build_optimizer(model: GPTModel, config: TransformerConfig, sched: Any, *, steps: int,
                    parallel: ParallelConfig) -> Optim:
    """megatron DDP (grads reduced in fp32) + Adam (distributed on GPU) + LR scheduler; on CUDA the grad
    reduce overlaps the backward pass and the parameter all-gather the next forward."""
    dist_opt = parallel.distributed_optimizer and not ON_CPU  # DistributedOptimizer rejects CPU tensors
    overlap_grad = parallel.overlap_grad_reduce  # also on CPU: gloo's async all-reduce runs the same code
    overlap_param = parallel.overlap_param_gather and dist_opt
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad, overlap_param_gather=overlap_param,
        use_distributed_optimizer=dist_opt, check_for_nan_in_grad=not ON_CPU), model)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=sched.lr, min_lr=sched.min_lr, weight_decay=sched.weight_decay,
                              adam_beta1=sched.adam_beta1, adam_beta2=sched.adam_beta2, adam_eps=sched.adam_eps,
                              clip_grad=sched.clip_grad, bf16=config.bf16, params_dtype=config.params_dtype,
                              use_distributed_optimizer=dist_opt, overlap_param_gather=overlap_param)
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    warmup = int(round(sched.warmup_fraction * steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else sched.lr, max_lr=sched.lr, min_lr=sched.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=steps, lr_decay_style=DecayStyle(sched.decay).megatron,
        start_wd=sched.weight_decay, end_wd=sched.weight_decay, wd_incr_steps=steps, wd_incr_style="constant")
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad:  # reduce only after the last micro-batch (Megatron-LM's training loop does the same)
        config.no_sync_func = ddp.no_sync
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
@contextlib.contextmanager
def params_in_sync(opt: Optim) -> Iterator[None]:
    """With the overlapped parameter all-gather, the last step's parameters arrive only in the next forward:
    gather them now (for a checkpoint), as Megatron-LM does around its saves."""
    hooked = getattr(opt.ddp, "use_forward_hook", False)
    if hooked:
        opt.ddp.disable_forward_pre_hook()  # also starts a synchronous param all-gather
    try:
        yield
    finally:
        if hooked:
            opt.ddp.enable_forward_pre_hook()


def save_checkpoint(path: Path, opt: Optim, common: dict[str, Any]) -> None:
    """Distributed checkpoint (model + optimizer, resharding-capable) and the scheduler/loop state."""
    with params_in_sync(opt):
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


def rng_state() -> dict[str, Any]:
    """This rank's generators: torch (CPU, CUDA), megatron's model-parallel RNG tracker (dropout inside
    tensor-parallel regions on GPU), numpy and Python."""
    return {"torch": torch.get_rng_state(), "cuda": [] if ON_CPU else torch.cuda.get_rng_state_all(),
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker"):
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
