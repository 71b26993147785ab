"""The fused Triton kernel against the literal definition: on CPU through Triton's interpreter, on CUDA
when present (the interpreter checks the maths, the GPU run checks the compiled kernel)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_attention_stats import literal_reference, rel

triton = pytest.importorskip("triton", reason="triton not installed (pip install triton)")

CASES = [(64, 4, 2, 16, None), (128, 4, 1, 32, 100), (96, 2, 2, 16, 40)]


_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from longattn.selection.triton_stats import triton_far_attention_stats
from test_attention_stats import literal_reference, rel
out = []
for L, h, hkv, d, n_valid in {cases!r}:
    g = torch.Generator().manual_seed(L)
    q = torch.randn(h, L, d, generator=g) * 1.5
    k = torch.randn(hkv, L, d, generator=g) * 1.5
    ds, var = triton_far_attention_stats(q, k, n_valid=n_valid, block_m=16, block_n=16)
    rds, rvar = literal_reference(q, k, n_valid=n_valid)
    out.append([rel(ds, rds), rel(var, rvar)])
print(json.dumps(out))
"""


def test_kernel_equals_literal_in_interpreter():
    # TRITON_INTERPRET must be set before triton is imported: a fresh process runs the kernel on CPU.
    tests = str(Path(__file__).parent)
    code = _SCRIPT.format(tests=tests, cases=CASES)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(tests).parent)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, (rel_ds, rel_var) in zip(CASES, json.loads(proc.stdout.strip().splitlines()[-1]), strict=True):
        assert rel_ds <= 1e-5 and rel_var <= 1e-5, case


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_on_gpu(dtype):
    from longattn.selection.triton_stats import triton_far_attention_stats

    assert os.environ.get("TRITON_INTERPRET") != "1"
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(8, 1024, 128, generator=g)).to(dtype)
    k = (torch.randn(2, 1024, 128, generator=g)).to(dtype)
    ds, var = triton_far_attention_stats(q.cuda(), k.cuda(), n_valid=1000)
    rds, rvar = literal_reference(q.float(), k.float(), n_valid=1000)
    assert rel(ds.cpu(), rds) <= 1e-5 and rel(var.cpu(), rvar) <= 1e-5
