"""CPU debugging aid: lets megatron-core train a tiny model on a laptop without a CUDA device.

megatron-core (checked on 0.16.1 and 0.19.2) hard-codes CUDA in places that matter even for a CPU run:
``torch.cuda.current_device()`` as the device of RoPE frequencies, scratch buffers and DDP grad buffers;
``torch.cuda.current_stream()`` in DDP's grad sync (0.19);
``device="cuda"`` tensors in the forward/backward schedule, the grad-norm reduction and the checkpoint
writer; ``torch.cuda.synchronize()`` in the checkpoint writer; and a ``torch.cuda.FloatTensor`` type
assertion in gradient clipping. Every work-around lives here and is applied only when
``torch.cuda.is_available()`` is false; GPU runs never import this module.

What changes on CPU (said in the log too):
- ``cpu_device_scope()`` maps those CUDA device requests to the CPU for the duration of the run;
- gradient clipping scales grads with plain torch instead of the CUDA multi-tensor kernel;
- megatron's DistributedOptimizer rejects non-CUDA parameters, so the CPU path uses megatron's
  non-distributed optimizer (same Adam, same clipping; optimizer state replicated instead of sharded);
- bf16 is turned off (fp32 everywhere) so the tests can compare logits with transformers at 1e-4.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)


def needed() -> bool:
    """The work-arounds apply only without a CUDA device."""
    return not torch.cuda.is_available()


def _is_cuda(device: Any) -> bool:
    try:
        return device is not None and torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


class _CudaAsCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` in torch calls (factories, ``.to``, ``.cuda()``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # Same maths as megatron's clip_grad_by_total_norm_fp32, without its CUDA type assertion and kernel.
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for p in parameters:
        grad = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


class _NullStream:
    """Stands for ``torch.cuda.current_stream()`` (megatron-core >= 0.19 waits on it in DDP): CPU work is in order."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


@contextlib.contextmanager
def cpu_device_scope() -> Iterator[None]:
    """Run megatron-core on the CPU inside this scope (no-op when CUDA is available)."""
    if not needed():
        yield
        return
    from megatron.core.optimizer import optimizer as mcore_optimizer

    saved = (torch.cuda.synchronize, torch.cuda.current_device, torch.cuda.current_stream,
             mcore_optimizer.clip_grad_by_total_norm_fp32)
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    log.warning("no CUDA device: megatron-core runs through train.cpu_compat (a debugging aid; fp32, "
                "non-distributed optimizer, CUDA device requests mapped to the CPU)")
    try:
        with _CudaAsCpu():
            yield
    finally:
        (torch.cuda.synchronize, torch.cuda.current_device, torch.cuda.current_stream,
         mcore_optimizer.clip_grad_by_total_norm_fp32) = saved
