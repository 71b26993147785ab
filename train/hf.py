"""The HF side of training: the LLaMA config of ``model=...``, its weights (read slice by slice), the HF
directory an export writes, and the FLOPs per token that MFU counts.

A ``random`` model (tiny_llama) is the one random LLaMA of ``longattn.common.models``, so runs at any
tensor-parallel size start from the same weights. ``model.rope_theta`` sets the RoPE base (ABF, 2.5e6 for
LLaMA-3 at 32k) in both the megatron model and the exported config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from longattn.common.models import ModelConfig, ModelSource, random_llama_config, random_llama_weights
from train.convert import DictReader, Shape

log = logging.getLogger(__name__)


def llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seq_length: int) -> LlamaConfig:
    """The architecture to train: the checkpoint's (hf) or ModelConfig's dims (random); ABF theta applied."""
    if cfg.source == ModelSource.hf:
        src = AutoConfig.from_pretrained(cfg.path)
        if src.model_type != "llama":
            raise ValueError(f"model.path={cfg.path}: model_type={src.model_type!r}, training needs llama")
        rope = dict(src.rope_parameters or {})
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"model.path={cfg.path}: rope_type={rope['rope_type']!r} is not supported "
                             "(LLaMA-3 with plain RoPE and an ABF base is)")
        conf = LlamaConfig(**{k: v for k, v in src.to_dict().items() if k not in ("architectures",)})
    else:  # the same network as the scorers' model=... (longattn.common.models)
        conf = random_llama_config(cfg, len(tokenizer), tokenizer)
    theta = float(cfg.rope_theta) if cfg.rope_theta is not None else float(conf.rope_parameters["rope_theta"])
    conf.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    conf.max_position_embeddings = max(seq_length, conf.max_position_embeddings or 0)
    conf.tie_word_embeddings = False  # megatron's output layer is separate; a tied source is untied on load
    return conf


def rope_theta(conf: Any) -> float:
    return float(conf.rope_parameters["rope_theta"])


def shape_of(conf: LlamaConfig) -> Shape:
    return Shape(num_layers=conf.num_hidden_layers, num_heads=conf.num_attention_heads,
                 num_kv_heads=conf.num_key_value_heads,
                 head_dim=getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads,
                 vocab_size=conf.vocab_size)


class SafetensorsReader:
    """Slices of the tensors of a HF safetensors directory, read without loading whole tensors."""

    def __init__(self, root: Path):
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"model.path={root}: no *.safetensors (convert .bin checkpoints first)")
        self.where: dict[str, str] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                self.where |= {k: str(f) for k in sf.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.where[name], framework="pt") as sf:
            return tuple(sf.get_slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        with safe_open(self.where[name], framework="pt") as sf:
            sl = sf.get_slice(name)
            if dim is None:
                return sl[:]
            index = [slice(None)] * len(sl.get_shape())
            index[dim] = slice(start, stop)
            return sl[tuple(index)]


def initial_weights(cfg: ModelConfig, conf: LlamaConfig) -> DictReader | SafetensorsReader:
    """A reader of the starting point's HF tensors: the checkpoint's files (hf) or the random model of ``cfg``."""
    if cfg.source == ModelSource.hf:
        return SafetensorsReader(Path(cfg.path))
    return DictReader(random_llama_weights(conf, cfg.seed))


def save_hf(out: Path, conf: LlamaConfig, state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase,
            dtype: torch.dtype = torch.float32) -> None:
    """A HF directory that transformers 4.4x and 5.x (and lm-eval) load: config, safetensors, tokenizer."""
    with torch.device("meta"):
        model = LlamaForCausalLM(conf)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_compatible_config(out / "config.json", rope_theta(conf), dtype)
    log.info("exported HF model to %s", out)


def write_compatible_config(path: Path, theta: float, dtype: torch.dtype) -> None:
    """transformers 5 writes RoPE's base only inside ``rope_parameters``; 4.x reads the top-level ``rope_theta``
    (10000 when absent) and ``torch_dtype``: write both spellings so either version reads the ABF base."""
    conf = json.loads(path.read_text())
    conf["rope_theta"] = theta
    conf.setdefault("rope_scaling", None)
    conf["torch_dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def flops_per_token(conf: Any, seq_length: int) -> float:
    """Training FLOPs per token with causal attention: 6 N + 6 L s d_attn.

    N counts the matrix-multiply weights a token passes through (every layer's projections and the output
    layer; the embedding is a lookup). Attention scores and values cost 2 x 2 s d_attn FLOPs per token and
    layer in the forward pass without a mask (d_attn = heads x head_dim); a causal mask halves the keys on
    average (s/2), and backward = 2 x forward, so 3 x 2 s d_attn = 6 s d_attn per layer.
    """
    h, f, layers, v = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers, conf.vocab_size
    d = getattr(conf, "head_dim", None) or h // conf.num_attention_heads
    attn = h * d * (2 * conf.num_attention_heads + 2 * conf.num_key_value_heads)
    params = layers * (attn + 3 * h * f) + v * h
    return 6.0 * params + 6.0 * layers * seq_length * conf.num_attention_heads * d
