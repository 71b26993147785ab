"""Units of data preparation: the work ``train.prepare`` deals out, tokenises (``train.tokenize``) and merges.

An input file (the selection, or a short source) is cut into units of ``data.prepare.unit_records`` records.
A unit is done when its marker holds the key of its inputs; a short source's units are tokenised in file
order only while the ones before hold fewer tokens than the mix needs (its budget).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longattn.common.io import json_digest
from train.config import TrainRunConfig
from train.tokenize import TokenSpec, UnitTask, init_worker, iter_raw_records, safe_name, tokenize_unit

log = logging.getLogger(__name__)

WINDOWS, SHORT = "windows", "short"


@dataclass(frozen=True)
class Input:
    """One input file and the key of its units (what they were tokenised from and how)."""

    kind: str
    name: str
    path: str
    key: str

    def unit_dir(self, root: Path) -> Path:
        return root / "units" / f"{safe_name(self.name)}-{self.key}"

    def unit_prefix(self, root: Path, k: int) -> str:
        return str(self.unit_dir(root) / f"u{k:06d}")


# ----------------------------------------------------------------------------------------------- units
def _done(prefix: str, key: str) -> dict[str, Any] | None:
    try:
        marker = json.loads(Path(prefix + ".done.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if marker.get("key") == key else None


def _short_tokens(marker: dict[str, Any]) -> int:
    return sum(o["tokens"] for o in marker["outputs"].values())


def short_needed(inp: Input, root: Path, k: int, budget: int, unit_records: int) -> bool:
    """Whether unit k of a short source is needed: the units before it (their token counts where known, the
    mean of the known ones otherwise) hold fewer than ``budget`` tokens, and none of them ended the file."""
    known, unknown = [], 0
    for j in range(k):
        m = _done(inp.unit_prefix(root, j), inp.key)
        if m is None:
            unknown += 1
        elif m["records"] < unit_records:
            return False  # the file ended before unit k
        else:
            known.append(_short_tokens(m))
    if not known:
        return True
    return sum(known) + unknown * (sum(known) / len(known)) < budget


def short_units(inp: Input, unit_records: int) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """(unit index, its raw records) in file order; a full last unit is followed by an empty one (the end)."""
    unit: list[tuple[int, str]] = []
    k = 0
    for rec in iter_raw_records(inp.path):
        unit.append(rec)
        if len(unit) == unit_records:
            yield k, unit
            k, unit = k + 1, []
    yield k, unit


class _Workers:
    """Tokeniser processes (spawned: the parent runs torch threads) or this process for ``data.workers=0``;
    at most ``limit`` units in flight, so the caller decides what comes next from what finished."""

    def __init__(self, cfg: TrainRunConfig):
        self.n = cfg.data.workers
        if self.n > 0:
            self.pool = mp.get_context("spawn").Pool(self.n, initializer=init_worker, initargs=(cfg.model,))
        else:
            init_worker(cfg.model)
        self.inflight: deque = deque()
        self.finished = 0

    def submit(self, task: UnitTask, limit: int) -> None:
        if self.n == 0:
            tokenize_unit(task)
            self.finished += 1
            return
        self.inflight.append(self.pool.apply_async(tokenize_unit, (task,)))
        while len(self.inflight) >= limit:
            self.wait_one()

    def wait_one(self) -> None:
        self.inflight.popleft().get()
        self.finished += 1

    def drain(self) -> None:
        while self.inflight:
            self.wait_one()

    def close(self) -> None:
        self.drain()
        if self.n > 0:
            self.pool.close()
            self.pool.join()


def tokenize_share(cfg: TrainRunConfig, spec: TokenSpec, ins: list[Input], scan: dict | None, budgets: dict[str, int],
                   root: Path, rank: int, world: int) -> int:
    """Tokenise this rank's units that are not finished yet; returns how many it tokenised."""
    c = cfg.data.prepare.unit_records
    workers = _Workers(cfg)
    t0 = time.perf_counter()
    try:
        for inp in ins:
            inp.unit_dir(root).mkdir(parents=True, exist_ok=True)
            if inp.kind == WINDOWS:
                assert scan is not None
                for k, offset in enumerate(scan["offsets"]):
                    prefix = inp.unit_prefix(root, k)
                    if k % world == rank and _done(prefix, inp.key) is None:
                        workers.submit(UnitTask(WINDOWS, inp.name, k, prefix, inp.key, spec, path=inp.path,
                                                offset=offset, count=c), limit=4 * max(workers.n, 1))
                continue
            if inp.name not in budgets:
                continue
            workers.drain()  # short budgets are decided from finished units
            for k, records in short_units(inp, c):
                if not short_needed(inp, root, k, budgets[inp.name], c):
                    break
                prefix = inp.unit_prefix(root, k)
                if k % world == rank and _done(prefix, inp.key) is None:
                    workers.submit(UnitTask(SHORT, inp.name, k, prefix, inp.key, spec, lines=tuple(records)),
                                   limit=max(workers.n, 1))
                if len(records) < c:
                    break
            workers.drain()
    finally:
        workers.close()
    if workers.finished:
        log.info("data prep rank %d/%d: tokenised %d units in %.1f s", rank, world, workers.finished,
                 time.perf_counter() - t0)
    return workers.finished


def units_for_merge(inp: Input, root: Path, scan: dict | None, budgets: dict[str, int], unit_records: int
                    ) -> tuple[list[dict[str, Any]], list[int]]:
    """(done markers to merge, in order; indices of needed units that are missing)."""
    if inp.kind == WINDOWS:
        assert scan is not None
        markers = [_done(inp.unit_prefix(root, k), inp.key) for k in range(len(scan["offsets"]))]
        return [m | {"k": k} for k, m in enumerate(markers) if m], [k for k, m in enumerate(markers) if m is None]
    if inp.name not in budgets:
        return [], []
    used, tokens, k = [], 0, 0
    while tokens < budgets[inp.name]:
        m = _done(inp.unit_prefix(root, k), inp.key)
        if m is None:
            return used, [k]
        used.append(m | {"k": k})
        tokens += _short_tokens(m)
        if m["records"] < unit_records:
            break
        k += 1
    return used, []


# ------------------------------------------------------------------------------------------------ merge
def merge_source(name: str, inp: Input, root: Path, markers: list[dict[str, Any]], dtype: type) -> dict[str, Any]:
    """Concatenate the units' outputs for dataset ``name`` into ``root/merged/<name>-<digest>``."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    part = "" if inp.kind == SHORT else name
    parts = [m for m in markers if part in m["outputs"]]
    prefix = str(root / "merged" / f"{safe_name(name)}-{json_digest([inp.key, name, [m['k'] for m in parts]])}")
    if not Path(prefix + ".ids").is_file():
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{prefix}.tmp{os.getpid()}"
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        with open(tmp + ".ids", "w", encoding="utf-8") as ids:
            for m in parts:
                unit = inp.unit_prefix(root, m["k"]) + (f".{safe_name(part)}" if part else "")
                builder.add_index(unit)
                ids.write(Path(unit + ".ids").read_text(encoding="utf-8"))
        builder.finalize(tmp + ".idx")
        for ext in (".bin", ".idx", ".ids"):  # .ids last: it marks a finished merge
            os.replace(tmp + ext, prefix + ext)
    return {"prefix": prefix, "docs": sum(m["outputs"][part]["docs"] for m in parts),
            "tokens": sum(m["outputs"][part]["tokens"] for m in parts)}


def unit_stats(markers: list[dict[str, Any]]) -> dict[str, int]:
    total: Counter = Counter()
    for m in markers:
        total.update(m.get("stats", {}))
    return dict(total)
