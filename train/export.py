"""Distributed checkpoint -> HF LLaMA directory, on CPU in one process (``longattn-export``; the end of a
training run calls the same function on one rank).

megatron's ``torch_dist`` checkpoints are PyTorch Distributed Checkpoint (DCP) directories whose model
tensors are stored whole (global shape): layers stacked on a leading axis, QKV fused per query group,
``fc1`` as [gate; up], the vocabulary padded, names as TransformerEngine's layer spec spells them. So one
process reads them with ``torch.distributed.checkpoint`` (``no_dist``: no process group, no NCCL) into a
template made from the checkpoint's own metadata, whatever TP size wrote it. The HF config and tokenizer
come from ``checkpoints/hf_template``, written by the training run before its first step.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from train.convert import from_te_names, mcore_to_hf
from train.hf import save_hf, shape_of

log = logging.getLogger(__name__)

TEMPLATE = "hf_template"


def checkpoint_dir(run_dir: Path, step: int | None = None) -> Path:
    """``run_dir/checkpoints/step_N`` (``latest`` when step is None)."""
    ckpts = Path(run_dir) / "checkpoints"
    if step is None:
        latest = ckpts / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{run_dir}: no checkpoints/latest (has the run saved a checkpoint?)")
        return ckpts / latest.read_text().strip()
    path = ckpts / f"step_{step:08d}"
    if not path.is_dir():
        have = sorted(p.name for p in ckpts.glob("step_*"))
        raise FileNotFoundError(f"{path} does not exist; checkpoints: {', '.join(have) or 'none'}")
    return path


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a megatron ``torch_dist`` checkpoint, whole, on the CPU (optimizer state and
    TransformerEngine's ``_extra_state`` are not read)."""
    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if isinstance(m, TensorStorageMetadata) and not k.startswith("optimizer.")}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def unstack_layers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``decoder.layers.X`` of shape [layers, ...] -> ``decoder.layers.{i}.X``; swiglu halves saved as
    separate ``_w``/``_v`` tensors are joined to [gate; up]."""
    out = {}
    for name, w in sd.items():
        m = re.fullmatch(r"decoder\.layers\.(.+?)(_w|_v)?", name)
        if m is None:
            out[name] = w
            continue
        if m.group(2) == "_v":
            continue
        if m.group(2) == "_w":
            w = torch.cat([w, sd[name[:-2] + "_v"]], dim=1)
        for i in range(w.shape[0]):
            out[f"decoder.layers.{i}.{m.group(1)}"] = w[i]
    return out


def export_checkpoint(run_dir: Path, out: Path, step: int | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the HF LLaMA directory ``out`` from a training run's checkpoint; returns the checkpoint used.
    ``dtype`` None keeps the checkpoint's (bf16 from GPU runs, fp32 from the CPU path)."""
    from transformers import AutoTokenizer, LlamaConfig

    run_dir = Path(run_dir)
    path = checkpoint_dir(run_dir, step)
    template = run_dir / "checkpoints" / TEMPLATE
    if not (template / "config.json").is_file():
        raise FileNotFoundError(f"{template}/config.json is missing (written by longattn-train at its start)")
    conf = LlamaConfig.from_pretrained(template)
    full = from_te_names(unstack_layers(read_model_tensors(path)))
    dtype = dtype or full["embedding.word_embeddings.weight"].dtype
    save_hf(Path(out), conf, mcore_to_hf(full, shape_of(conf)), AutoTokenizer.from_pretrained(template), dtype)
    log.info("exported %s -> %s (%s)", path, out, str(dtype).removeprefix("torch."))
    return path
