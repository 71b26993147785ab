"""Exactness of the blockwise DS / Var against the literal L x L definition (docs/method.md §2)."""

import math

import pytest
import torch

from longattn.selection.attention_stats import (
    default_min_distance,
    far_attention_stats,
    naive_far_attention_stats,
    variance_from_moments,
)

RTOL = 1e-5


def literal_reference(q, k, *, n_valid=None, kmin=None):
    """The reference's loop, written out: masked softmax, far-region mask, .var() and .sum()/L (float64)."""
    h, L, d = q.shape
    g = h // k.shape[0]
    n_valid = L if n_valid is None else n_valid
    mask_size = 3 * (L // 4) if kmin is None else L - kmin
    far = torch.zeros(L, L, dtype=torch.float64)
    far[L - mask_size:, :mask_size] = torch.tril(torch.ones(mask_size, mask_size, dtype=torch.float64))
    add = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    add[:, n_valid:] = float("-inf")
    ds, var = [], []
    for i in range(h):
        w = q[i].double() @ k[i // g].double().T / math.sqrt(d) + add
        m = torch.softmax(w, dim=-1) * far
        ds.append(m.sum() / L)
        var.append(m.var())
    return torch.stack(ds), torch.stack(var)


def rel(a, b):
    return ((a - b).abs() / b.abs()).max().item()


@pytest.mark.parametrize(
    "L,h,hkv,d,block,n_valid",
    [(64, 4, 2, 16, 16, None), (128, 6, 2, 32, 7, None), (96, 4, 1, 8, 128, 60), (256, 8, 8, 64, 33, 255),
     (200, 4, 2, 16, 50, 1)],
)
def test_blockwise_equals_literal(L, h, hkv, d, block, n_valid):
    g = torch.Generator().manual_seed(L + h)
    q = torch.randn(h, L, d, generator=g) * 1.5
    k = torch.randn(hkv, L, d, generator=g) * 1.5
    ds, var = far_attention_stats(q, k, n_valid=n_valid, block_size=block)
    rds, rvar = literal_reference(q, k, n_valid=n_valid)
    assert rel(ds, rds) <= RTOL and rel(var, rvar) <= RTOL
    nds, nvar = naive_far_attention_stats(q, k, n_valid=n_valid)
    assert rel(nds, rds) <= RTOL and rel(nvar, rvar) <= RTOL


def test_peaked_attention_and_custom_distance():
    # Large logits: the log-sum-exp bookkeeping must not overflow.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 90, 16, generator=g) * 12
    k = torch.randn(1, 90, 16, generator=g) * 12
    ds, var = far_attention_stats(q, k, min_distance=30, block_size=16)
    rds, rvar = literal_reference(q, k, kmin=30)
    assert torch.isfinite(ds).all() and torch.isfinite(var).all()
    assert rel(ds, rds) <= RTOL and rel(var, rvar) <= RTOL


def test_uniform_attention_closed_form():
    # q = 0: every row is uniform over its causal keys, so DS and Var have a closed form.
    L = 64
    kmin = default_min_distance(L)
    q = torch.zeros(1, L, 8)
    k = torch.randn(1, L, 8)
    ds, var = far_attention_stats(q, k, block_size=10)
    s1 = sum((n - kmin + 1) / (n + 1) for n in range(kmin, L))
    s2 = sum((n - kmin + 1) / (n + 1) ** 2 for n in range(kmin, L))
    assert ds.item() == pytest.approx(s1 / L, rel=1e-12)
    assert var.item() == pytest.approx((s2 - s1 * s1 / L**2) / (L**2 - 1), rel=1e-9)


def test_min_distance_is_reference_mask():
    assert default_min_distance(32768) == 8192
    assert default_min_distance(2048) == 512
    assert default_min_distance(10) == 4  # 10 - 3 * 2


def test_variance_from_moments():
    x = torch.tensor([0.1, 0.0, 0.3, 0.0], dtype=torch.float64)
    assert variance_from_moments(x.sum(), (x * x).sum(), 4).item() == pytest.approx(x.var().item())


def test_half_precision_inputs_are_accumulated_in_float():
    g = torch.Generator().manual_seed(3)
    q = (torch.randn(4, 128, 32, generator=g)).half()
    k = (torch.randn(2, 128, 32, generator=g)).half()
    ds, var = far_attention_stats(q, k, block_size=32)
    rds, rvar = literal_reference(q.float(), k.float())
    assert ds.dtype == torch.float64
    assert rel(ds, rds) <= RTOL and rel(var, rvar) <= RTOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_blockwise_on_gpu():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(8, 512, 64, generator=g)
    k = torch.randn(2, 512, 64, generator=g)
    ds, var = far_attention_stats(q.cuda(), k.cuda(), block_size=64)
    rds, rvar = literal_reference(q, k)
    assert rel(ds.cpu(), rds) <= RTOL and rel(var.cpu(), rvar) <= RTOL
