"""Stage 3: evaluation on RULER, LongBench and short suites through lm-evaluation-harness (``eval`` extra).

Only ``eval.harness`` (evaluation) and ``eval.ruler`` (RULER generation) import lm-eval, lazily; metrics,
results, prompts and tables are pure and import without it.
"""
