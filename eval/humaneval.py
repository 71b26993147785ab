"""HumanEval pass@1: run prompt + completion + the problem's tests in a fresh interpreter, with a time limit.

A separate process in a temporary directory keeps generated code away from the evaluator; it is not a
sandbox, so run untrusted models' code on a machine you can afford to lose (as lm-eval's own warning says).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def passes(prompt: str, completion: str, test: str, entry_point: str, timeout: float = 10.0) -> bool:
    """True when the completed function passes its tests within ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "solution.py"
        path.write_text(program(prompt, completion, test, entry_point), encoding="utf-8")
        try:
            proc = subprocess.run([sys.executable, "-I", str(path)], cwd=d, capture_output=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0
