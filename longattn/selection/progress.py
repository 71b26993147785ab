"""Progress of the long steps as log lines, so that a SLURM log (no terminal) shows a run as it goes.

Each rank logs one dense line every ``log_every`` windows and at least every minute: what is done of its
total, windows/s, tokens/s, ETA and, for a resumed run, how much an earlier run had already done. The same
numbers are kept in a per-rank snapshot (``progress-score-rank-00003.json``); rank 0 adds up every rank's
snapshot and logs the totals and the per-rank rates to ``metrics.jsonl`` and W&B
(``select/progress/score/...``, ``select/progress/preprocess/...``) while the run goes, not only at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longattn.common.io import write_json

log = logging.getLogger(__name__)

__all__ = ["LOG_SECONDS", "Progress", "TotalsLogger", "LazyLogger", "format_duration", "snapshot_path",
           "per_rank_status"]

LOG_SECONDS = 60.0
"""A progress line at least this often, however slow the windows come."""


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}" if x >= 10 else f"{x:.2f}"


def _bytes(x: float) -> str:
    for div, suffix in ((2**30, "GB"), (2**20, "MB"), (2**10, "kB")):
        if x >= div:
            return f"{x / div:.1f} {suffix}"
    return f"{x:.0f} B"


def snapshot_path(directory: Path, stage: str, rank: int) -> Path:
    return directory / f"progress-{stage}-rank-{rank:05d}.json"


@dataclass
class Progress:
    """One rank's progress through one step (``score`` or ``preprocess``).

    ``total`` is in the quantity the ETA is measured in: windows when scoring, input bytes when
    pre-processing (the number of windows is unknown until the text is cut).
    """

    stage: str
    rank: int
    world: int
    total: float
    unit: str = "windows"
    """``windows`` or ``bytes`` (shown in MB)."""
    done_before: float = 0.0
    """Of ``total``, done by an earlier run (a resumed run starts from here)."""
    log_every: int = 1000
    """Windows between lines (and at least one line every ``LOG_SECONDS``)."""
    snapshot_dir: Path | None = None
    on_report: Callable[[dict[str, Any]], None] | None = None
    """Called with the numbers of every line (rank 0 logs the totals of all ranks from it)."""
    amount: float = 0.0
    windows: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._last_t, self._last_windows = self.t0, 0

    def resumed(self, amount: float) -> None:
        """``amount`` more of the total was found done (a journal from a killed run)."""
        self.done_before += amount

    def advance(self, amount: float, windows: int, tokens: int) -> None:
        self.amount += amount
        self.windows += windows
        self.tokens += tokens
        now = time.monotonic()
        if self.windows - self._last_windows >= self.log_every or now - self._last_t >= LOG_SECONDS:
            self.report()

    def numbers(self, finished: bool = False) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        done = self.done_before + self.amount
        rate = self.amount / elapsed
        left = max(self.total - done, 0.0)
        return {"stage": self.stage, "rank": self.rank, "world": self.world, "unit": self.unit, "done": done,
                "total": self.total, "done_before": self.done_before, "windows": self.windows,
                "tokens": self.tokens, "elapsed_s": elapsed, "windows_per_s": self.windows / elapsed,
                "tokens_per_s": self.tokens / elapsed, "eta_s": 0.0 if left == 0 else (left / rate if rate else None),
                "finished": finished, "time": time.time()}

    def line(self, n: dict[str, Any]) -> str:
        if self.unit == "bytes":
            amount = f"{_bytes(n['done'])}/{_bytes(n['total'])}"
            extra = f", {n['windows']} windows"
            before = _bytes(n["done_before"])
        else:
            amount = f"{n['done']:.0f}/{n['total']:.0f} windows"
            extra = ""
            before = f"{n['done_before']:.0f} windows"
        pct = 100.0 * n["done"] / n["total"] if n["total"] else 100.0
        text = (f"{self.stage} rank {self.rank}/{self.world}: {amount} ({pct:.1f}%){extra}, "
                f"{n['windows_per_s']:.2f} windows/s, {_si(n['tokens_per_s'])} tokens/s, "
                f"ETA {format_duration(n['eta_s'])}")
        if n["done_before"]:
            text += f"; {before} done before this run"
        return text + (" (finished)" if n["finished"] else "")

    def report(self, finished: bool = False) -> None:
        n = self.numbers(finished)
        log.info("%s", self.line(n))
        self._last_t, self._last_windows = time.monotonic(), self.windows
        if self.snapshot_dir is not None:
            write_json(snapshot_path(self.snapshot_dir, self.stage, self.rank), n)
        if self.on_report is not None:
            self.on_report(n)

    def close(self) -> None:
        self.report(finished=True)


class TotalsLogger:
    """Rank 0's view of every rank: reads the snapshots of one step and logs totals and per-rank rates to a
    ``MetricsLogger`` (``metrics.jsonl``, W&B). ``grand_total``: the step's total over all ranks, when known
    (the windows of the plan); else the sum of the totals the ranks reported."""

    def __init__(self, logger: Any, snapshot_dir: Path, stage: str, world: int, grand_total: float | None = None):
        self.logger, self.dir, self.stage, self.world, self.grand_total = logger, snapshot_dir, stage, world, grand_total

    def snapshots(self) -> dict[int, dict[str, Any]]:
        out = {}
        for r in range(self.world):
            p = snapshot_path(self.dir, self.stage, r)
            try:
                out[r] = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
        return out

    def totals(self) -> dict[str, Any]:
        snaps = self.snapshots()
        now = time.time()
        live = [s for s in snaps.values() if not s["finished"] and now - s["time"] < 3 * LOG_SECONDS]
        done = sum(s["done"] for s in snaps.values())
        total = self.grand_total if self.grand_total is not None else sum(s["total"] for s in snaps.values())
        rate = sum((s["done"] - s["done_before"]) / max(s["elapsed_s"], 1e-9) for s in live)  # unit/s
        p = f"select/progress/{self.stage}"
        m: dict[str, Any] = {f"{p}/done": done, f"{p}/total": total, f"{p}/ranks_reporting": len(snaps),
                             f"{p}/windows": sum(s["windows"] for s in snaps.values()),
                             f"{p}/windows_per_s": sum(s["windows_per_s"] for s in live),
                             f"{p}/tokens_per_s": sum(s["tokens_per_s"] for s in live),
                             f"{p}/eta_s": (max(total - done, 0.0) / rate) if rate else None,
                             f"{p}/elapsed_s": max((s["elapsed_s"] for s in snaps.values()), default=0.0)}
        for r, s in sorted(snaps.items()):
            m[f"{p}/rank{r}/done"] = s["done"]
            m[f"{p}/rank{r}/windows_per_s"] = s["windows_per_s"]
        return m

    def __call__(self, _mine: dict[str, Any] | None = None) -> None:
        if self.logger is not None:
            self.logger.log({k: v for k, v in self.totals().items() if v is not None})


class LazyLogger:
    """A ``MetricsLogger`` opened at its first use: nothing is written (nor a W&B run started) before the run's
    checks have passed and there is something to log."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory, self._logger = factory, None

    def get(self) -> Any:
        if self._logger is None:
            self._logger = self._factory()
        return self._logger

    def log(self, metrics: dict[str, Any]) -> None:
        self.get().log(metrics)

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
            self._logger = None


def per_rank_status(done: list[bool], owner: list[int], world: int, what: str, limit: int = 64) -> str:
    """``12/16 shards done; rank 0 6/6, rank 1 4/6, ...``: units done per rank (rank 0 reports it at merge)."""
    mine, ok = [0] * world, [0] * world
    for d, r in zip(done, owner, strict=True):
        mine[r] += 1
        ok[r] += d
    parts = [f"rank {r} {ok[r]}/{mine[r]}" for r in range(world)]
    more = f", ... ({world - limit} more ranks)" if world > limit else ""
    return f"{sum(ok)}/{len(done)} {what} done; " + ", ".join(parts[:limit]) + more
