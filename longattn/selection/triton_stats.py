"""Fused Triton kernel for the first-layer statistics (the GPU path of ``far_attention_stats``).

One program handles BLOCK_M query rows of one head and streams over the causal keys in BLOCK_N tiles,
keeping per row a running max m, the total softmax mass l, the far mass lf and the far sum of squares
lsq (online-softmax rescaling: l, lf by 2^(m_old - m_new), lsq by its square). No P·V product and no
L x L matrix; scores are fp32 from bf16/fp16/fp32 inputs, in log2 units so the kernel uses exp2. The
per-row results (far mass, far sum of squares) are summed over rows in float64 by the caller.

Tested against the literal definition on CPU with ``TRITON_INTERPRET=1`` and on CUDA when one is present.
"""

from __future__ import annotations

import math

import torch

from longattn.selection.attention_stats import LOG2E, default_min_distance, variance_from_moments

try:  # optional: only the GPU path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

__all__ = ["triton_available", "triton_far_attention_stats"]


def triton_available(device: torch.device | str) -> bool:
    import os

    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _far_stats_kernel(
        q_ptr, k_ptr, mass_ptr, sq_ptr,
        stride_qh, stride_ql, stride_kh, stride_kl,
        length, n_valid, kmin, group, scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // group
        rows = kmin + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < length
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + head * stride_qh + rows[:, None] * stride_ql + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_all = tl.zeros([BLOCK_M], tl.float32)
        l_far = tl.zeros([BLOCK_M], tl.float32)
        l_sq = tl.zeros([BLOCK_M], tl.float32)
        last_row = tl.minimum(kmin + (pid_m + 1) * BLOCK_M, length)
        k_end = tl.minimum(last_row, n_valid)
        for start in range(0, k_end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_ptr + kv_head * stride_kh + cols[:, None] * stride_kl + dims[None, :],
                        mask=(cols < k_end)[:, None], other=0.0)
            # ieee: fp32 inputs must not silently drop to tf32; fp16/bf16 products are exact in fp32.
            s = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale
            visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] < n_valid)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            far = visible & (cols[None, :] <= rows[:, None] - kmin)
            pf = tl.where(far, p, 0.0)
            l_all = l_all * alpha + tl.sum(p, axis=1)
            l_far = l_far * alpha + tl.sum(pf, axis=1)
            l_sq = l_sq * alpha * alpha + tl.sum(pf * pf, axis=1)
            m = m_new
        mass = l_far / l_all
        sq = l_sq / (l_all * l_all)
        tl.store(mass_ptr + head * length + rows, mass, mask=row_ok)
        tl.store(sq_ptr + head * length + rows, sq, mask=row_ok)


def triton_far_attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    min_distance: int | None = None,
    n_valid: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``far_attention_stats`` (q [H, L, d], k [Hkv, L, d]) -> (ds [H], var [H]) float64."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton, or use scorer.backend=torch")
    n_heads, length, dim = q.shape
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head dim {dim}: the Triton kernel needs a power of two >= 16 (use scorer.backend=torch)")
    kmin = default_min_distance(length) if min_distance is None else min_distance
    n_valid = length if n_valid is None else n_valid
    q, k = q.contiguous(), k.contiguous()
    mass = torch.zeros(n_heads, length, dtype=torch.float32, device=q.device)
    sq = torch.zeros_like(mass)
    grid = (triton.cdiv(length - kmin, block_m), n_heads)
    _far_stats_kernel[grid](
        q, k, mass, sq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        length, n_valid, kmin, n_heads // k.shape[0], LOG2E / math.sqrt(dim),
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n,
    )
    s1 = mass.double().sum(dim=1)
    s2 = sq.double().sum(dim=1)
    return s1 / length, variance_from_moments(s1, s2, length * length)
