"""``longattn-export RUN_DIR [--step N] --out DIR``: a training run's distributed checkpoint -> a HF LLaMA
directory, on CPU in one process (no process group, no GPU); see ``train.export``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="longattn-export", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a longattn-train out_dir (its checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", type=Path, required=True, help="HF directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights dtype (default: the checkpoint's: bf16 from GPU runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from train.export import export_checkpoint

    try:
        export_checkpoint(args.run_dir, args.out, step=args.step, dtype=DTYPES.get(args.dtype))
    except FileNotFoundError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
