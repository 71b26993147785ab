"""``python -m eval`` = ``longattn-eval``."""

from eval.cli import main

main()
