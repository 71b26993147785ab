"""Stage 3: evaluation through lm-evaluation-harness (needs the ``eval`` extra). Built in a later issue."""
