"""Ranks and "rank 0 builds, the others wait", shared by every stage.

Ranks come from explicit keys first, then torchrun (``RANK``/``WORLD_SIZE``), then the tasks of one SLURM job
(``SLURM_PROCID``/``SLURM_NTASKS``). SLURM array elements are separate jobs (a sweep may vary anything), so
an array shards only through explicit keys. Waiting is by polling files, not collectives: a collective's
timeout (minutes) is far shorter than tokenising a corpus.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from longattn.common.io import write_json

log = logging.getLogger(__name__)

__all__ = ["env_rank", "resolve_rank", "wait_for", "build_once"]

T = TypeVar("T")


def env_rank(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from torchrun or srun tasks; (0, 1) when neither launched more than one process."""
    env = dict(os.environ) if env is None else env
    for r_key, w_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r_key in env and w_key in env and int(env[w_key]) > 1:
            return int(env[r_key]), int(env[w_key])
    return 0, 1


def resolve_rank(rank: int | None = None, world: int | None = None, env: dict[str, str] | None = None,
                 key: str = "shard") -> tuple[int, int]:
    """(rank, world size): explicit values win, then the launcher's environment. ``key`` names the config
    keys in the error (``shard.rank`` / ``shard.world_size``)."""
    e_rank, e_world = env_rank(env)
    launched = e_world > 1
    rank = rank if rank is not None else (e_rank if launched else 0)
    world = world if world is not None else (e_world if launched else 1)
    if not 0 <= rank < world:
        raise ValueError(f"{key}.rank={rank} must be in [0, {key}.world_size={world})")
    return rank, world


def wait_for(ready: Callable[[], bool], what: str, *, poll_seconds: float = 2.0,
             timeout_s: float | None = None, hint: str = "") -> None:
    """Poll until ``ready()``; a clear error after ``timeout_s`` (None: wait forever)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    announced = False
    while not ready():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f} s{hint}")
        if not announced:
            log.info("waiting for %s", what)
            announced = True
        time.sleep(poll_seconds)


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def build_once(marker: Path, key: str, build: Callable[[], T], *, rank: int, poll_seconds: float = 2.0,
               timeout_s: float | None = None, hint: str = "") -> T:
    """Rank 0 runs ``build()`` and writes ``marker`` = {key, value} atomically; the other ranks wait for a
    marker holding this ``key`` and return its value. ``key`` names what was built (a digest of the inputs),
    so a marker left by an earlier run with other inputs is never taken for this one, and one with the same
    inputs is reused by every rank without building again. The value must be JSON."""
    old = _read_marker(marker)
    if old is not None and old.get("key") == key:
        return old["value"]
    if rank == 0:
        value = build()
        write_json(marker, {"key": key, "value": value})
        return value

    def ready() -> bool:
        found = _read_marker(marker)
        return found is not None and found.get("key") == key

    wait_for(ready, f"rank 0 to write {marker}", poll_seconds=poll_seconds, timeout_s=timeout_s, hint=hint)
    return _read_marker(marker)["value"]  # type: ignore[index]
