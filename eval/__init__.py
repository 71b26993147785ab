"""Stage 3: evaluation on RULER, LongBench and short suites through lm-evaluation-harness (``eval`` extra).

Only ``eval.harness`` imports lm-eval; metrics, results and tables are pure and import without it.
"""
