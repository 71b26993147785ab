"""Deterministic shards of the window stream, rank assignment, completion markers and waiting.

Pre-processing is spread over the ranks in pieces (``longattn.selection.pieces``); once every piece is done,
rank 0 numbers the windows and writes ``shards/plan.json``. The windows to score are cut, in id order, into
shards of ``shard.windows``; shard ``s`` belongs to rank ``s % world_size``. The plan says where each shard
starts (so a rank seeks to its shards instead of reading the whole corpus); each shard's scores are journaled
and, when complete, renamed to ``shards/scores-00042.jsonl`` — the rename is the completion marker. A rerun
skips finished shards and resumes a partial one from its journal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longattn.common.distributed import wait_for
from longattn.common.errors import Choice, ConfigError
from longattn.common.io import InputRecord, write_json

log = logging.getLogger(__name__)

__all__ = ["ShardConfig", "MergeMode", "Stage", "my_shards", "Plan", "build_plan"]


class Stage(Choice):
    all = "all"
    """Pre-process (this rank's pieces), score (this rank's shards), merge (``shard.merge``)."""
    preprocess = "preprocess"
    """Only pre-process this rank's pieces, then exit: a CPU job array prepares the windows for GPU jobs."""


class MergeMode(Choice):
    auto = "auto"
    """Rank 0 waits for every shard, then selects and writes the outputs."""
    never = "never"
    """Score only (array elements of a sweep; a later ``only`` run merges)."""
    only = "only"
    """Skip scoring and merge (fails, naming them, if shards are missing)."""


@dataclass
class ShardConfig:
    windows: int = 1000
    """Windows per shard: the unit of work, of completion markers and of what a kill can lose at most."""
    piece_mb: float = 256.0
    """Pre-processing unit: uncompressed JSON Lines inputs larger than this (MiB) are cut into byte ranges of
    about this size; other files are one piece each. Pieces are spread over the ranks; a kill loses at most
    the piece in flight. Fixed at the first run of an out_dir (the outputs do not depend on it)."""
    rank: int | None = None
    """This process's rank; null = from torchrun (RANK) or srun tasks (SLURM_PROCID). SLURM array elements
    are separate jobs (a sweep may vary anything), so an array shards only through explicit shard.rank."""
    world_size: int | None = None
    """Number of ranks; null = from WORLD_SIZE or SLURM_NTASKS (else 1)."""
    merge: MergeMode = MergeMode.auto
    """``auto``: rank 0 waits for every shard, then selects and writes the outputs; ``never``: score only;
    ``only``: skip scoring and merge (fails, naming them, if shards are missing)."""
    poll_seconds: float = 5.0
    """How often a waiting rank looks for the plan or for other ranks' shards."""
    wait_hours: float = 72.0
    """Give up waiting after this long (a rank that died is visible as its missing shards)."""

    def validate(self) -> None:
        if self.windows < 1:
            raise ConfigError(f"shard.windows={self.windows} must be >= 1")
        if self.piece_mb <= 0:
            raise ConfigError(f"shard.piece_mb={self.piece_mb} must be positive")
        if self.wait_hours <= 0 or self.poll_seconds <= 0:
            raise ConfigError("shard.wait_hours and shard.poll_seconds must be positive")

    def wait(self, ready: Callable[[], bool], what: str) -> None:
        """Poll for ``ready()`` every ``poll_seconds``, giving up after ``wait_hours``."""
        wait_for(ready, what, poll_seconds=self.poll_seconds, timeout_s=self.wait_hours * 3600,
                 hint=f" (shard.wait_hours={self.wait_hours})")


def my_shards(n_shards: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n_shards, world))


@dataclass
class Plan:
    """Where each shard starts in the window source, and what the planning pass skipped."""

    n_windows: int
    shard_windows: int
    starts: list[dict[str, Any]]
    """Per shard: ``path`` (index into sources), ``offset`` (bytes, or -1 for compressed files), ``line``;
    in a ``pieces`` plan also ``counters`` (id prefix -> windows numbered before the shard)."""
    sources: list[str]
    skipped: dict[str, int]
    skip_lines: list[list[Any]]
    """(source index, line) of records skipped for a global reason (duplicate data_id)."""
    notes: dict[str, Any] = field(default_factory=dict)
    """What reading the sources repaired or could not read (``InputNotes.to_dict``)."""
    kind: str = "windows"
    """``windows``: the user's window files (``data.preprocessed``), checked as read; ``pieces``: this stage's
    pre-processing pieces, numbered while read (``id_prefix``, per-start ``counters``); ``sample``: the
    sampled ``windows.jsonl`` (``window.sample_size``). The last two are named relative to out_dir."""
    id_prefix: str = ""
    """``window.id_prefix`` of a ``pieces`` plan."""

    @property
    def n_shards(self) -> int:
        return len(self.starts)

    def save(self, path: Path) -> None:
        write_json(path, self.__dict__)

    @classmethod
    def load(cls, path: Path) -> Plan:
        plan = cls(**json.loads(path.read_text()))
        if plan.kind != "windows":  # named relative to out_dir (plan.json is out_dir/shards/plan.json)
            plan.sources = [str(path.parent.parent / s) for s in plan.sources]
        return plan


def build_plan(records: Iterator[tuple[int, InputRecord, int, bool]], sources: list[str], shard_windows: int,
               skipped: dict[str, int], skip_lines: list[list[Any]]) -> Plan:
    """``records`` yields (source index, record, byte offset or -1, valid) in order; shards cut every N valid."""
    starts: list[dict[str, Any]] = []
    n = 0
    for src, rec, offset, valid in records:
        if not valid:
            continue
        if n % shard_windows == 0:
            starts.append({"path": src, "offset": offset, "line": rec.line})
        n += 1
    return Plan(n, shard_windows, starts, sources, dict(skipped), skip_lines)
