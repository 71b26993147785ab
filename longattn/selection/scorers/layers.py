"""LongAttn statistics from any decoder layers and heads (beyond the paper): ``scorer=longattn_layers``.

The paper reads layer 0 only; this scorer runs the full causal LM up to the deepest requested layer and
computes the same DS / Var (docs/method.md §2, same input, padding and far region) from the RoPE'd queries and keys of
each requested layer, averaged over the requested heads, so the probe can test whether layer 0 is the best
choice. With ``layers=[0]`` and all heads it equals ``scorer=longattn`` (a test checks it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from longattn.common.errors import Choice, ConfigError
from longattn.common.models import ModelConfig
from longattn.selection.attention_stats import far_attention_stats, naive_far_attention_stats
from longattn.selection.scorers import device_name, register_scorer, stats_row
from longattn.selection.scorers.longattn import LongAttnScorerConfig, PaddedInput

__all__ = ["LayersScorerConfig", "LayersScorer"]


class LayersBackend(Choice):
    """This scorer runs the whole model up to the deepest layer in torch: no fused kernel."""

    torch = "torch"
    """The blockwise pass."""
    naive = "naive"
    """The literal L x L definition, for checks only."""


@dataclass
class LayersScorerConfig(LongAttnScorerConfig):
    name: str = "longattn_layers"
    """Registry key of the scorer."""
    layers: list[int] = field(default_factory=lambda: [0])
    """Decoder layers whose attention statistics are averaged (0 = the paper's first layer)."""
    heads: list[int] | None = None
    """Query heads averaged (indices within a layer); null = all."""
    backend: LayersBackend = LayersBackend.torch  # type: ignore[assignment]
    """``torch`` (blockwise) or ``naive`` (literal L x L, for checks)."""

    def validate(self, length: int) -> None:
        super().validate(length)
        if not self.layers or min(self.layers) < 0:
            raise ConfigError(f"scorer.layers={self.layers}: give layer indices >= 0, e.g. [0]")
        if self.heads is not None and (not self.heads or min(self.heads) < 0):
            raise ConfigError(f"scorer.heads={self.heads}: give head indices >= 0, or null for all")


class _Stop(Exception):
    """Raised by the hook of the deepest requested layer: the rest of the model is not needed."""


@register_scorer("longattn_layers", LayersScorerConfig)
class LayersScorer(PaddedInput):
    """DS and Var per (layer, head); ``ds`` / ``var`` are their means over the requested layers and heads."""

    def __init__(self, cfg: LayersScorerConfig, model_cfg: ModelConfig, length: int):
        from longattn.common.models import load_causal_lm, load_tokenizer

        t0 = time.perf_counter()
        self.cfg, self.length = cfg, length
        self._set_input(cfg, load_tokenizer(model_cfg))
        self.model = load_causal_lm(model_cfg, len(self.tokenizer))
        decoder = self.model.model.layers
        if max(cfg.layers) >= len(decoder):
            raise ConfigError(f"scorer.layers={cfg.layers}: model {model_cfg.name} has {len(decoder)} layers")
        heads = self.model.config.num_attention_heads
        if cfg.heads is not None and max(cfg.heads) >= heads:
            raise ConfigError(f"scorer.heads={cfg.heads}: model {model_cfg.name} has {heads} query heads")
        self.load_seconds = time.perf_counter() - t0

    @property
    def device(self) -> str:
        return device_name(next(self.model.parameters()).device)

    def _qk(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """RoPE'd q [B, H, L, d] and k [B, Hkv, L, d] of each requested layer, from its input hidden states."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        deepest = max(self.cfg.layers)

        def hook(layer_idx: int, module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            attn = module.self_attn
            b, n, _ = hidden.shape
            x = module.input_layernorm(hidden)
            q = attn.q_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
            out[layer_idx] = apply_rotary_pos_emb(q, k, cos, sin)
            if layer_idx == deepest:
                raise _Stop

        handles = [self.model.model.layers[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: hook(i, m, a, kw), with_kwargs=True) for i in sorted(set(self.cfg.layers))]
        try:
            self.model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return out

    @torch.inference_mode()
    def score(self, windows: list[dict[str, Any]], prepared: tuple[torch.Tensor, list[int]]) -> list[dict[str, Any]]:
        device = next(self.model.parameters()).device
        ids, n_valid = prepared
        mask = (torch.arange(self.length)[None] < torch.tensor(n_valid)[:, None]).long()
        qk = self._qk(ids.to(device), mask.to(device))
        rows = []
        for i, (w, n) in enumerate(zip(windows, n_valid, strict=True)):
            ds, var = [], []
            for layer in self.cfg.layers:
                q, k = qk[layer]
                if self.cfg.backend == LayersBackend.naive:
                    d, v = naive_far_attention_stats(q[i].float(), k[i].float(), min_distance=self.cfg.min_distance,
                                                     n_valid=n)
                else:
                    d, v = far_attention_stats(q[i].float(), k[i].float(), min_distance=self.cfg.min_distance,
                                               n_valid=n, block_size=self.cfg.block_size)
                sel = slice(None) if self.cfg.heads is None else list(self.cfg.heads)
                ds.append(d[sel])
                var.append(v[sel])
            rows.append({**stats_row(w, n, torch.cat(ds), torch.cat(var)), "layers": list(self.cfg.layers)})
        return rows
