"""The HF side of training: the LLaMA config of ``model=...``, its weights, and the exported ``hf/`` directory.

A ``random`` model (tiny_llama) is the one random LLaMA of ``longattn.common.models``, so runs at any
tensor-parallel size start from the same weights. ``model.rope_theta`` sets the RoPE base (ABF, 2.5e6 for
LLaMA-3 at 32k) in both the megatron model and the exported config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from longattn.common.models import ModelConfig, ModelSource, random_llama_config, random_llama_weights
from train.convert import Shape

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


def shape_of(conf: LlamaConfig) -> Shape:
    return Shape(num_layers=conf.num_hidden_layers, num_heads=conf.num_attention_heads,
                 num_kv_heads=conf.num_key_value_heads,
                 head_dim=getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads,
                 vocab_size=conf.vocab_size)


def initial_weights(cfg: ModelConfig, conf: LlamaConfig) -> dict[str, torch.Tensor]:
    """HF state dict of the starting point: the checkpoint's tensors (hf) or the random model of ``cfg``."""
    if cfg.source == ModelSource.hf:
        return read_safetensors(Path(cfg.path))
    weights = random_llama_weights(conf, cfg.seed)
    if "lm_head.weight" not in weights:  # a tied random model is trained untied (megatron's own output layer)
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    return weights


def read_safetensors(root: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF safetensors directory (sharded or not), in their stored dtype."""
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.path={root}: no *.safetensors (convert .bin checkpoints first)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out |= {k: sf.get_tensor(k) for k in sf.keys()}
    return out


def save_hf(out: Path, conf: LlamaConfig, state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase,
            dtype: torch.dtype = torch.float32) -> None:
    """A HF directory that transformers and lm-eval load: config, safetensors weights and the tokenizer."""
    with torch.device("meta"):
        model = LlamaForCausalLM(conf)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.config.torch_dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("exported HF model to %s", out)


def flops_per_token(conf: Any, seq_length: int) -> float:
    """Training FLOPs per token: 6 x parameters + attention 12 x layers x hidden x seq (PaLM's MFU count)."""
    h, f, L, v = conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers, conf.vocab_size
    d = getattr(conf, "head_dim", None) or h // conf.num_attention_heads
    attn = h * d * (2 * conf.num_attention_heads + 2 * conf.num_key_value_heads)
    params = L * (attn + 3 * h * f) + 2 * v * h
    return 6.0 * params + 12.0 * L * h * seq_length
