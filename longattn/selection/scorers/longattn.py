"""The LongAttn scorer: DS and Var of every query head of the first decoder layer (docs/method.md §2)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from longattn.common.errors import Choice, ConfigError
from longattn.common.models import ModelConfig
from longattn.selection.attention_stats import far_attention_stats, naive_far_attention_stats
from longattn.selection.config import ScorerConfig
from longattn.selection.scorers import device_name, register_scorer, stats_row
from longattn.selection.triton_stats import triton_available, triton_far_attention_stats

log = logging.getLogger(__name__)

__all__ = ["LongAttnScorerConfig", "LongAttnScorer", "encode_reference", "encode_tokens"]


class ScoringInput(Choice):
    reference = "reference"
    """``bos + ' ' + content`` with special tokens, truncated / padded with eos to L (the reference)."""
    tokens = "tokens"
    """The window's own token ids (no re-tokenisation, no padding when exactly L)."""


class Backend(Choice):
    auto = "auto"
    """``triton`` on CUDA when installed and the head dimension allows it, else ``torch``."""
    torch = "torch"
    """The blockwise pass (any device)."""
    triton = "triton"
    """The fused Triton kernel (CUDA)."""
    naive = "naive"
    """The literal L x L definition, for checks only."""


@dataclass
class LongAttnScorerConfig(ScorerConfig):
    name: str = "longattn"
    """Registry key of the scorer."""
    input: ScoringInput = ScoringInput.reference
    """``reference``: tokenise ``bos + ' ' + content`` with special tokens, pad/truncate to L with eos (the reference);
    ``tokens``: score the window's own token ids (no re-tokenisation, no padding when exactly L)."""
    min_distance: int | None = None
    """Minimum token distance k; null = L - 3*(L//4), i.e. L/4 (the reference)."""
    block_size: int = 128
    """Query rows per block of the blockwise pass (memory O(L x block x group))."""
    batch_size: int = 1
    """Windows per forward pass."""
    backend: Backend = Backend.auto
    """``auto`` (``triton`` on CUDA when installed, else ``torch``) | ``torch`` (blockwise) | ``triton`` (fused
    kernel) | ``naive`` (literal L x L, for checks only)."""

    def validate(self, length: int) -> None:
        if length % 4 != 0 and self.min_distance is None:
            raise ConfigError(f"window.length={length} must be divisible by 4 (k = L/4), or set scorer.min_distance")
        if self.block_size < 1:
            raise ConfigError(f"scorer.block_size={self.block_size} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"scorer.batch_size={self.batch_size} must be >= 1")


def encode_reference(tokenizer: Any, content: str, length: int) -> list[int]:
    """The reference's scoring input: ``bos + ' ' + content`` with special tokens, truncated to L.

    (For LLaMA-3 tokenizers this starts with two BOS tokens, as in the reference.)
    """
    bos = tokenizer.bos_token or ""
    return tokenizer(bos + " " + content, add_special_tokens=True, truncation=True, max_length=length)["input_ids"]


def encode_tokens(tokenizer: Any, content: str, length: int) -> list[int]:
    """The window's own tokens, without special tokens, at most L."""
    return tokenizer(content, add_special_tokens=False)["input_ids"][:length]


def reference_pad_id(tokenizer: Any) -> int:
    """The reference pads with eos (pad_token = eos_token) and masks the padding as keys."""
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    return int(pad or 0)


def pad_batch(windows: list[dict[str, Any]], tokenizer: Any, encode: Callable[..., list[int]], length: int,
              pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Token ids [B, L] (each window encoded, then padded with ``pad_id``) and each window's real length."""
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    n_valid = []
    for i, w in enumerate(windows):
        toks = encode(tokenizer, w["content"], length)
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        n_valid.append(len(toks))
    return ids, n_valid


def resolve_backend(backend: str, device: torch.device, head_dim: int) -> str:
    """``auto``: the fused Triton kernel on CUDA (when triton is installed and d is a power of two),
    the blockwise torch pass elsewhere; both compute the same numbers."""
    if backend != "auto":
        return backend
    if triton_available(device) and device.type == "cuda" and head_dim >= 16 and not head_dim & (head_dim - 1):
        return "triton"
    return "torch"


class PaddedInput:
    """The scoring input of both LongAttn scorers (``scorer.input``): each window encoded, padded to L."""

    length: int

    def _set_input(self, cfg: LongAttnScorerConfig, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pad_id = reference_pad_id(tokenizer)
        self.encode = encode_reference if cfg.input == ScoringInput.reference else encode_tokens

    def prepare(self, windows: list[dict[str, Any]]) -> tuple[torch.Tensor, list[int]]:
        """CPU side of a batch (tokenise, pad): run by the pipeline in a thread, overlapping scoring."""
        return pad_batch(windows, self.tokenizer, self.encode, self.length, self.pad_id)


@register_scorer("longattn", LongAttnScorerConfig)
class LongAttnScorer(PaddedInput):
    """DS and Var of every query head of the first decoder layer (docs/method.md §2)."""

    def __init__(self, cfg: LongAttnScorerConfig, model_cfg: ModelConfig, length: int):
        from longattn.common.models import load_tokenizer
        from longattn.selection.first_layer import load_first_layer

        t0 = time.perf_counter()
        self.cfg, self.length = cfg, length
        self._set_input(cfg, load_tokenizer(model_cfg))
        self.model = load_first_layer(model_cfg)
        self.backend = resolve_backend(cfg.backend, self.model.device, self.model.head_dim)
        self._stats: Callable[..., tuple[torch.Tensor, torch.Tensor]] = {
            "naive": naive_far_attention_stats, "torch": self._blockwise, "triton": triton_far_attention_stats,
        }[self.backend]
        log.info("scorer backend: %s on %s", self.backend, self.model.device)
        self.load_seconds = time.perf_counter() - t0

    @property
    def device(self) -> str:
        return device_name(self.model.device)

    def _blockwise(self, q: torch.Tensor, k: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return far_attention_stats(q, k, block_size=self.cfg.block_size, **kw)

    @torch.inference_mode()
    def score(self, windows: list[dict[str, Any]], prepared: tuple[torch.Tensor, list[int]]) -> list[dict[str, Any]]:
        ids, n_valid = prepared  # moved to the model's device in stats_for_ids
        stats = self.stats_for_ids(self.model, ids, n_valid, self.cfg, self._stats)
        return [stats_row(w, n, ds, var) for w, n, (ds, var) in zip(windows, n_valid, stats, strict=True)]

    @staticmethod
    @torch.inference_mode()
    def stats_for_ids(model: Any, ids: torch.Tensor, n_valid: list[int], cfg: LongAttnScorerConfig,
                      stats: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(DS, Var) per window of a padded batch [B, L], one key/value group at a time.

        Going group by group keeps memory at O(L x hidden + L x block x group): q for all 32 heads of a
        32k window is never materialised.
        """
        if stats is None:
            def stats(q: torch.Tensor, k: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
                return far_attention_stats(q, k, block_size=cfg.block_size, **kw)
        hidden = model.hidden_states(ids)
        cos, sin = model.rope(hidden)
        per_group: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in n_valid]
        for g in range(model.num_kv_heads):
            q, k = model.group_qk(hidden, cos, sin, g)
            for i, n in enumerate(n_valid):
                per_group[i].append(stats(q[i], k[i], min_distance=cfg.min_distance, n_valid=n))
            del q, k
        return [(torch.cat([d for d, _ in gs]), torch.cat([v for _, v in gs])) for gs in per_group]
