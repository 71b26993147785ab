"""First-layer attention statistics of LongAttn (docs/method.md §2), pure tensor-in / numbers-out functions.

For one window of L tokens and one query head, with M = softmax(QK^T / sqrt(d) + causal mask):

- DS  = (sum of M over the far region) / L, the far region being rows n >= k and keys i <= n - k;
- Var = unbiased variance of the L x L matrix equal to M on the far region and 0 elsewhere.

``far_attention_stats`` computes both without an L x L matrix: per block of query rows it forms the
(block x L) score strip, and from its row-wise log-sum-exp gets the far mass and far sum of squares of each
row (docs/method.md §2); sums are float64. ``naive_far_attention_stats`` is the literal definition, kept
for tests and the benchmark.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634

__all__ = [
    "default_min_distance",
    "far_attention_stats",
    "naive_far_attention_stats",
    "variance_from_moments",
]


def default_min_distance(length: int) -> int:
    """k such that the far region is the reference's lower triangle of size 3*(L//4): k = L - 3*(L//4)."""
    return length - 3 * (length // 4)


def variance_from_moments(s1: torch.Tensor, s2: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased variance of n numbers whose sum is s1 and sum of squares is s2 (float64)."""
    return (s2 - s1 * s1 / n) / (n - 1)


@torch.no_grad()
def far_attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    min_distance: int | None = None,
    n_valid: int | None = None,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise DS and Var per query head.

    q: [H, L, d] and k: [Hkv, L, d], RoPE applied; query head h uses key head h // (H // Hkv) (GQA).
    n_valid: keys at positions >= n_valid are padding (masked as keys; their query rows still count, as in
    the reference's padded batches). Returns (ds, var), each float64 of shape [H].
    """
    n_heads, length, dim = q.shape
    n_kv = k.shape[0]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
    group = n_heads // n_kv
    kmin = default_min_distance(length) if min_distance is None else min_distance
    n_valid = length if n_valid is None else n_valid
    s1 = torch.zeros(n_heads, dtype=torch.float64, device=q.device)
    s2 = torch.zeros_like(s1)
    # Scores in log2 units: exp2 is several times faster than exp on CPU and exactly as accurate.
    # Scaling q (not the scores) saves a pass over every strip.
    scale = LOG2E / math.sqrt(dim)
    for g in range(n_kv):
        qg = (q[g * group : (g + 1) * group].float() * scale).transpose(0, 1).contiguous()  # [L, G, d]
        a1, a2 = _group_moments(qg, k[g].float(), kmin, n_valid, block_size)
        s1[g * group : (g + 1) * group] = a1
        s2[g * group : (g + 1) * group] = a2
    ds = s1 / length
    var = variance_from_moments(s1, s2, length * length)
    return ds, var


def _group_moments(
    qg: torch.Tensor, kg: torch.Tensor, kmin: int, n_valid: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over far rows of (far mass, far sum of squares) for the G query heads sharing one key head.

    qg: [L, G, d] (pre-scaled), kg: [L, d]. Each block of rows is one 2-D matmul of (rows x G) queries,
    twice as fast on CPU as a batched one.
    """
    length, group, dim = qg.shape
    s1 = torch.zeros(group, dtype=torch.float64, device=qg.device)
    s2 = torch.zeros_like(s1)
    # Two strip buffers reused by every block: fresh multi-MB allocations would page-fault on each block.
    size = min(block, length) * group * min(length, n_valid)
    buf, sq_buf = torch.empty(size, device=qg.device), torch.empty(size, device=qg.device)
    # Rows n < k have no far keys, so they are skipped entirely.
    for r0 in range(kmin, length, block):
        r1 = min(r0 + block, length)
        kend = min(r1, n_valid)  # keys any row of this block may see
        m = (r1 - r0) * group
        s = torch.mm(qg[r0:r1].reshape(-1, dim), kg[:kend].T, out=buf[: m * kend].view(m, kend))
        s3 = s.view(r1 - r0, group, kend)
        rows = torch.arange(r0, r1, device=s.device)[:, None, None]
        if kend > r0:  # the diagonal block needs the causal mask
            cols = torch.arange(r0, kend, device=s.device)
            s3[:, :, r0:kend].masked_fill_(cols > rows, float("-inf"))
        s.sub_(s.amax(dim=-1, keepdim=True))
        torch.special.exp2(s, out=s)
        # Row sums in fp32 (cascade summation, ~1e-7 relative); everything across rows in float64.
        total = s.sum(dim=-1).double()
        # Far keys of row n are [0, min(n - k + 1, n_valid)): a prefix common to the block plus a band.
        c_lo = min(r0 - kmin + 1, n_valid)
        c_hi = min(r1 - kmin, n_valid)
        if c_hi > c_lo:
            cols = torch.arange(c_lo, c_hi, device=s.device)
            s3[:, :, c_lo:c_hi].masked_fill_(cols > rows - kmin, 0.0)
        far = s[:, :c_hi]
        far_sum = far.sum(dim=-1).double()
        far_sq = torch.mul(far, far, out=sq_buf[: m * c_hi].view(m, c_hi)).sum(dim=-1).double()
        s1 += (far_sum / total).view(r1 - r0, group).sum(dim=0)
        s2 += (far_sq / (total * total)).view(r1 - r0, group).sum(dim=0)
    return s1, s2


@torch.no_grad()
def naive_far_attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    min_distance: int | None = None,
    n_valid: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The literal per-head definition with full L x L matrices, as the reference computes it.

    Memory O(L^2) per head: for tests and the benchmark only.
    """
    n_heads, length, dim = q.shape
    group = n_heads // k.shape[0]
    kmin = default_min_distance(length) if min_distance is None else min_distance
    n_valid = length if n_valid is None else n_valid
    idx = torch.arange(length, device=q.device)
    masked = (idx[None, :] > idx[:, None]) | (idx[None, :] >= n_valid)
    far = (idx[:, None] >= kmin) & (idx[None, :] <= idx[:, None] - kmin)
    ds = torch.empty(n_heads, dtype=torch.float64)
    var = torch.empty(n_heads, dtype=torch.float64)
    for h in range(n_heads):
        scores = (q[h].to(dtype) @ k[h // group].to(dtype).T) / math.sqrt(dim)
        probs = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1)
        m = probs * far
        ds[h] = m.sum().double() / length
        var[h] = m.var().double()
    return ds, var
