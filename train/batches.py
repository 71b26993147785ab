"""Samples and batches as tensors: pure functions (no megatron import) that a test can call with ten tokens.

A sample is ``tokens``, ``labels``, ``loss_mask`` and ``position_ids`` of ``seq_length`` positions. Document
boundaries inside a packed sample are where ``position_ids`` restarts at 0 (megatron's GPTDataset with
``reset_position_ids``); from them come the per-document causal mask of the local attention and the
``cu_seqlens`` of TransformerEngine's packed (``thd``) attention, so no token attends across documents.
"""

from __future__ import annotations

import numpy as np
import torch

PAD = -1
"""Padding label: masked from the loss, mapped to token 0 for the embedding."""


def window_sample(doc: np.ndarray, seq_length: int) -> dict[str, torch.Tensor]:
    """One selected window as one sample: inputs ``doc[:L]``, targets ``doc[1:L+1]``; shorter documents are
    padded, the padding masked from the loss. With a BOS in front (``[BOS] + window`` of L+1 tokens) every
    window token is a target; without it the window's last position has none."""
    text = np.full(seq_length + 1, PAD, dtype=np.int64)
    n = min(len(doc), seq_length + 1)
    text[:n] = doc[:n]
    tokens, labels = torch.from_numpy(text[:-1].copy()), torch.from_numpy(text[1:].copy())
    loss_mask = (labels != PAD).float()
    return {"tokens": tokens.clamp(min=0), "labels": labels.clamp(min=0), "loss_mask": loss_mask,
            "position_ids": torch.arange(seq_length, dtype=torch.long)}


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per position, the index of its document within the row (a new document where positions restart)."""
    return torch.cumsum((position_ids == 0).long(), dim=-1)


def causal_document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, L, L] bool, True = masked: causal and block-diagonal over the documents of each row."""
    doc = document_ids(position_ids)
    n = position_ids.shape[-1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=position_ids.device), 1)
    other_doc = doc.unsqueeze(-1) != doc.unsqueeze(-2)
    return (future | other_doc).unsqueeze(1)


def is_packed(position_ids: torch.Tensor) -> bool:
    """Whether any row holds more than one document."""
    return bool((position_ids[:, 1:] == 0).any())


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries of the documents of the flattened batch ([b*L]) as TransformerEngine's ``cu_seqlens``
    (int32, starting at 0, ending at b*L) and the longest document."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    starts = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    if starts[0] != 0:  # a row always starts a document; keep the contract explicit
        starts = torch.cat([starts.new_zeros(1), starts])
    return starts, int((starts[1:] - starts[:-1]).max())


def pad_documents_for_cp(batch: dict[str, torch.Tensor], multiple: int) -> tuple[dict[str, torch.Tensor],
                                                                                torch.Tensor, torch.Tensor]:
    """Re-lay a flattened packed batch ([1, n]) so every document starts at a multiple of ``multiple``
    (2 x context-parallel size, what TransformerEngine's ``thd`` context parallelism needs), within the same n
    positions: pads (masked from the loss) go after each document, and the tail of the last document that no
    longer fits is dropped. Returns the new batch, ``cu_seqlens`` (real lengths) and ``cu_seqlens_padded``."""
    n = batch["tokens"].shape[-1]
    assert n % multiple == 0, f"sequence of {n} tokens is not a multiple of {multiple}"
    bounds, _ = cu_seqlens(batch["position_ids"])
    out = {k: torch.zeros_like(v) for k, v in batch.items()}
    real, padded, at = [0], [0], 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        if at >= n:
            break
        length = min(b - a, n - at)
        for k, v in batch.items():
            out[k][..., at : at + length] = v[..., a : a + length]
        out["position_ids"][..., at : at + length] = torch.arange(length)
        span = -(-length // multiple) * multiple
        at = min(at + span, n)
        real.append(real[-1] + length)
        padded.append(at)
    out["loss_mask"] = _mask_outside(out["loss_mask"], real, padded)
    # TransformerEngine: cu_seqlens = cumulative real lengths, cu_seqlens_padded = where documents start.
    return out, torch.tensor(real, dtype=torch.int32), torch.tensor(padded, dtype=torch.int32)


def _mask_outside(loss_mask: torch.Tensor, real: list[int], padded: list[int]) -> torch.Tensor:
    keep = torch.zeros_like(loss_mask)
    for i in range(1, len(padded)):
        start = padded[i - 1]
        keep[..., start : start + real[i] - real[i - 1]] = 1
    return loss_mask * keep

