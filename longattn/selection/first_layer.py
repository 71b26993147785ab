"""First attention layer of a LLaMA model: token ids -> RoPE'd queries and keys of layer 0.

Only the four tensors layer 0 needs are read (embeddings, input norm, q/k projections), from a HF
safetensors directory, a GGUF file or a seeded random init, so a 70B checkpoint costs one embedding
matrix. The maths reuses transformers' own LLaMA modules, so results equal ``LlamaModel`` layer 0.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from longattn.common.models import (
    ModelConfig,
    ModelSource,
    hf_dir,
    load_tokenizer,
    random_llama_config,
    random_llama_weights,
    resolve_device,
    resolve_gguf_file,
    torch_dtype,
)

log = logging.getLogger(__name__)

# Architectures whose layer 0 (q/k path) is exactly LLaMA's.
_HF_TYPES = ("llama", "mistral")


class FirstLayerQK(torch.nn.Module):
    """embed_tokens -> input_layernorm -> q_proj / k_proj -> RoPE, as in HF ``LlamaModel`` layer 0."""

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads
        self.head_dim: int = config.head_dim
        self.vocab_size: int = config.vocab_size
        self.dtype: torch.dtype = dtype
        self.device: torch.device = device
        h, bias = config.hidden_size, config.attention_bias
        # Built on meta and filled with assign=True: no throw-away random init of a 128k x 8k embedding.
        with torch.device("meta"):
            self.embed_tokens = torch.nn.Embedding(config.vocab_size, h)
            self.input_layernorm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
            self.q_proj = torch.nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
            self.k_proj = torch.nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in weights.items()},
                             strict=True, assign=True)
        # inv_freq stays float32 (as in HF); only cos/sin are cast to the activation dtype in forward.
        self.rotary_emb = LlamaRotaryEmbedding(config).to(device)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.LongTensor, chunk: int = 4096) -> torch.Tensor:
        """Normed embeddings [B, L, hidden]; per-token maths, computed in chunks of positions so that the
        RMSNorm temporaries stay small at 32k x 8k."""
        input_ids = input_ids.to(self.device)
        b, n = input_ids.shape
        out = torch.empty(b, n, self.config.hidden_size, dtype=self.dtype, device=self.device)
        for i in range(0, n, chunk):
            out[:, i : i + chunk] = self.input_layernorm(self.embed_tokens(input_ids[:, i : i + chunk]))
        return out

    @torch.no_grad()
    def rope(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, L, d] at positions 0..L-1 (HF passes the hidden states only for dtype/device)."""
        positions = torch.arange(hidden.shape[1], device=self.device).unsqueeze(0)
        return self.rotary_emb(hidden, positions)

    @torch.no_grad()
    def group_qk(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, G, L, d] of the query heads sharing key head ``group``, and that k [B, 1, L, d].

        Projects with row slices of q_proj / k_proj, so a 32k x 32-head q never exists at once.
        """
        b, n, _ = hidden.shape
        d, per = self.head_dim, self.num_heads // self.num_kv_heads
        qs, ks = slice(group * per * d, (group + 1) * per * d), slice(group * d, (group + 1) * d)
        qb = None if self.q_proj.bias is None else self.q_proj.bias[qs]
        kb = None if self.k_proj.bias is None else self.k_proj.bias[ks]
        q = torch.nn.functional.linear(hidden, self.q_proj.weight[qs], qb).view(b, n, per, d).transpose(1, 2)
        k = torch.nn.functional.linear(hidden, self.k_proj.weight[ks], kb).view(b, n, 1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q.contiguous(), k.contiguous()

    @torch.no_grad()
    def forward(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, L] -> q [B, H, L, d], k [B, Hkv, L, d]: RoPE applied at positions 0..L-1, in self.dtype."""
        input_ids = input_ids.to(self.device)
        b, n = input_ids.shape
        hidden = self.input_layernorm(self.embed_tokens(input_ids))
        q = self.q_proj(hidden).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, n, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rope(hidden)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q.contiguous(), k.contiguous()


def _override_theta(config: LlamaConfig, cfg: ModelConfig) -> None:
    # transformers 5 reads the base only from rope_parameters["rope_theta"]: setting config.rope_theta
    # or passing rope_theta= to from_pretrained is silently ignored when config.json has it.
    if cfg.rope_theta is not None:
        config.rope_parameters["rope_theta"] = float(cfg.rope_theta)


def _llama_config(*, vocab_size: int, hidden_size: int, heads: int, kv_heads: int, head_dim: int,
                  max_pos: int, eps: float, rope: dict[str, Any], bias: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       max_position_embeddings=max_pos, rms_norm_eps=eps, rope_parameters=copy.deepcopy(rope),
                       attention_bias=bias)


def _load_hf(cfg: ModelConfig) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    root = hf_dir(cfg)
    src = AutoConfig.from_pretrained(root)
    if src.model_type not in _HF_TYPES:
        raise ValueError(f"{root}/config.json: model_type={src.model_type!r}; only {_HF_TYPES} are supported")
    if isinstance(src.rope_parameters, dict) and "rope_type" not in src.rope_parameters:
        raise ValueError(f"{root}/config.json: per-layer rope_parameters are not supported")
    bias = bool(getattr(src, "attention_bias", False))
    config = _llama_config(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, heads=src.num_attention_heads,
        kv_heads=src.num_key_value_heads or src.num_attention_heads,
        head_dim=getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads,
        max_pos=src.max_position_embeddings, eps=src.rms_norm_eps, rope=src.rope_parameters, bias=bias)

    # key -> file holding it, from the index (sharded) or the single file's header; no tensor read yet.
    index, single = root / "model.safetensors.index.json", root / "model.safetensors"
    if index.is_file():
        listing = index
        where = {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    elif single.is_file():
        listing = single
        with safe_open(str(single), framework="pt") as f:
            where = dict.fromkeys(f.keys(), single)
    elif any(root.glob("pytorch_model*.bin")):
        raise ValueError(f"{root} holds pytorch_model*.bin only: safetensors is needed to read layer 0 alone "
                         "(convert with model.save_pretrained(dir, safe_serialization=True))")
    else:
        raise FileNotFoundError(f"{root}: neither model.safetensors.index.json nor model.safetensors")

    prefix = "model." if "model.embed_tokens.weight" in where else ""  # LlamaForCausalLM vs LlamaModel
    layer = f"{prefix}layers.0."
    full = {"embed_tokens.weight": f"{prefix}embed_tokens.weight",
            "input_layernorm.weight": f"{layer}input_layernorm.weight",
            "q_proj.weight": f"{layer}self_attn.q_proj.weight", "k_proj.weight": f"{layer}self_attn.k_proj.weight"}
    if bias:
        full |= {"q_proj.bias": f"{layer}self_attn.q_proj.bias", "k_proj.bias": f"{layer}self_attn.k_proj.bias"}
    by_file: dict[Path, list[str]] = {}
    for k, key in full.items():
        if key not in where:
            raise KeyError(f"{listing}: tensor {key!r} not found")
        by_file.setdefault(where[key], []).append(k)
    weights: dict[str, torch.Tensor] = {}
    for path, ks in by_file.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path} (listed in {listing} for {full[ks[0]]!r}) is missing")
        with safe_open(str(path), framework="pt") as f:  # memory-mapped: reads only the requested tensors
            for k in ks:
                weights[k] = f.get_tensor(full[k])
    return config, weights


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert permutes q/k rows for its interleaved RoPE; this is transformers' exact inverse.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _load_gguf(cfg: ModelConfig) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    import gguf  # lazy: only this source needs it

    file = resolve_gguf_file(cfg)
    reader = gguf.GGUFReader(file)  # memory-mapped

    def meta(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"{file}: general.architecture={arch!r}; only llama GGUF files are supported")
    heads = int(meta("llama.attention.head_count"))
    kv_heads = int(meta("llama.attention.head_count_kv", heads))
    hidden = int(meta("llama.embedding_length"))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(meta("llama.rope.freq_base", 10000.0))}
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope = {**rope, "rope_type": "linear", "factor": float(meta("llama.rope.scaling.factor"))}
    elif scaling != "none":
        log.warning("%s: rope.scaling.type=%s is ignored (as transformers does)", file, scaling)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        log.warning("%s: rope_freqs (llama3 RoPE scaling) is ignored, as transformers does", file)

    names = {"embed_tokens.weight": "token_embd.weight", "input_layernorm.weight": "blk.0.attn_norm.weight",
             "q_proj.weight": "blk.0.attn_q.weight", "k_proj.weight": "blk.0.attn_k.weight"}
    bias = "blk.0.attn_q.bias" in tensors
    if bias:
        names |= {"q_proj.bias": "blk.0.attn_q.bias", "k_proj.bias": "blk.0.attn_k.bias"}
    weights: dict[str, torch.Tensor] = {}
    for k, name in names.items():
        if name not in tensors:
            raise KeyError(f"{file}: tensor {name!r} not found")
        t = tensors[name]
        # GGUF lists dims fastest-first (ne0 = in_features): reversed, it is the torch [out, in] layout.
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        if k.startswith("q_proj"):
            w = _unpermute(w, heads)
        elif k.startswith("k_proj"):
            w = _unpermute(w, kv_heads)
        weights[k] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: the memmap is read-only
    config = _llama_config(
        vocab_size=weights["embed_tokens.weight"].shape[0], hidden_size=hidden, heads=heads, kv_heads=kv_heads,
        head_dim=int(meta("llama.rope.dimension_count", hidden // heads)),
        max_pos=int(meta("llama.context_length", 2048)),
        eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)), rope=rope, bias=bias)
    return config, weights


def _load_random(cfg: ModelConfig) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Layer 0 of the one random LLaMA of ``cfg`` (``longattn.common.models``): only its four tensors are drawn."""
    vocab = cfg.vocab_size if cfg.vocab_size is not None else len(load_tokenizer(cfg))
    full = random_llama_config(cfg, vocab)
    names = {"embed_tokens.weight": "model.embed_tokens.weight",
             "input_layernorm.weight": "model.layers.0.input_layernorm.weight",
             "q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
             "k_proj.weight": "model.layers.0.self_attn.k_proj.weight"}
    drawn = random_llama_weights(full, cfg.seed, names.values())
    config = _llama_config(vocab_size=full.vocab_size, hidden_size=full.hidden_size, heads=full.num_attention_heads,
                           kv_heads=full.num_key_value_heads, head_dim=full.head_dim,
                           max_pos=full.max_position_embeddings, eps=full.rms_norm_eps,
                           rope=full.rope_parameters, bias=False)
    return config, {k: drawn[v] for k, v in names.items()}


def load_first_layer(cfg: ModelConfig) -> FirstLayerQK:
    """Layer 0 of the model ``cfg`` describes (source hf, gguf or random), in eval mode without gradients."""
    dtype, device = torch_dtype(cfg), resolve_device(cfg)
    loaders = {ModelSource.hf: _load_hf, ModelSource.gguf: _load_gguf, ModelSource.random: _load_random}
    config, weights = loaders[ModelSource(cfg.source)](cfg)
    _override_theta(config, cfg)
    model = FirstLayerQK(config, weights, dtype, device)
    log.info("model %s (%s): %d heads, %d kv heads, head_dim %d, vocab %d, rope %s, %s on %s", cfg.name,
             cfg.source, model.num_heads, model.num_kv_heads, model.head_dim, model.vocab_size,
             config.rope_parameters, cfg.dtype, device)
    return model


