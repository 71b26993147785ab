"""``python -m eval`` = ``longattn-eval``."""

from longattn.cli.eval import main

main()
