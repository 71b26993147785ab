"""Resume safety: a rerun reuses only outputs made from the same inputs with the same config.

``out_dir`` holds two kinds of fingerprints, checked before anything is written:

- ``windows.fingerprint.json`` and ``scores.fingerprint.json``: the config keys the windows and the scores
  depend on. A rerun that changes one is refused, naming the keys (use another ``out_dir``).
- ``inputs.fingerprint.json``: every input file, in order, by real path, size, mtime and SHA-256. The hash is
  taken from the reading itself (``longattn.common.io.file_digest``: the readers hash the bytes they read),
  so fingerprinting costs no second read of the corpus. On a rerun an input is the same when its real path,
  size and mtime are unchanged (the quick check of make and rsync); when only the mtime or the path changed,
  its hash decides (a touched or moved file is the same input); a different size, hash or number of inputs
  is a change: refused naming the files, or with ``data.on_change=redo`` the outputs made from the old
  content are deleted and the run starts again.

Rank 0 checks and records. Other ranks check the config read-only and wait until the recorded inputs match
what they see, so they never read a plan or windows that rank 0 is about to redo.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from longattn.common.io import file_digest, write_json
from longattn.selection.config import OnChange, SelectRunConfig

log = logging.getLogger(__name__)

__all__ = ["ResumeRefused", "InputStamp", "input_changes", "InputsFingerprint", "check_fingerprint", "open_run",
           "RunGuard", "DERIVED"]

DERIVED = ["windows.jsonl", "windows.raw.jsonl", "preprocess.json", "preprocess", "shards", "scores.jsonl",
           "selected.jsonl", "rejected.jsonl", "metrics.json", "report.png", "report.md", "dataset",
           "windows.fingerprint.json", "scores.fingerprint.json"]
"""What ``data.on_change=redo`` deletes: everything in ``out_dir`` made from the inputs."""


class ResumeRefused(RuntimeError):
    """A rerun would mix outputs of another config or of other input content; the message says what differs."""


# --- config fingerprints --------------------------------------------------------------------------
def _diff(path: Path, fields: dict[str, Any]) -> list[str]:
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fields.items() if old.get(k) != v]


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(fields, default=str))


def check_fingerprint(out_dir: Path, name: str, fields: dict[str, Any], *, write: bool = True) -> None:
    """Refuse to resume from outputs made with a different config (they would be silently mixed)."""
    path = out_dir / f"{name}.fingerprint.json"
    fields = _jsonable(fields)
    if diff := _diff(path, fields):
        raise ResumeRefused(f"out_dir={out_dir} holds {name} outputs made with another config ({'; '.join(diff)}): "
                            f"use a new out_dir, or delete {path.parent / name}* to redo them")
    if write and not path.exists():
        write_json(path, fields)


def config_fingerprints(cfg: SelectRunConfig) -> dict[str, dict[str, Any]]:
    """name -> the config keys its outputs depend on."""
    data = {"data.preprocessed": cfg.data.preprocessed, "data.text_key": cfg.data.text_key,
            "data.category": cfg.data.category, "data.id_key": cfg.data.id_key}
    window = {f"window.{k}": v for k, v in asdict(cfg.window).items() if k not in ("workers", "batch_docs")}
    model = {f"model.{k}": v for k, v in asdict(cfg.model).items() if k != "device"}
    scorer = {f"scorer.{k}": v for k, v in asdict(cfg.scorer).items() if k not in ("batch_size", "backend")}
    out = {}
    if not cfg.data.preprocessed:
        out["windows"] = _jsonable({**data, **window, "tokenizer": model["model.tokenizer"] or model["model.path"]
                                    or model["model.gguf_file"]})
    out["scores"] = _jsonable({**data, "window.length": cfg.window.length, "shard.windows": cfg.shard.windows,
                               **model, **scorer})
    return out


# --- input fingerprints ---------------------------------------------------------------------------
@dataclass
class InputStamp:
    """One input file as a rerun recognises it."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    """Filled once the file has been read whole (from that read)."""

    @classmethod
    def of(cls, path: str) -> InputStamp:
        st = os.stat(path)
        return cls(os.path.realpath(path), st.st_size, st.st_mtime_ns)

    def quick_equal(self, other: InputStamp) -> bool:
        return (self.path, self.size, self.mtime_ns) == (other.path, other.size, other.mtime_ns)


def input_changes(old: list[InputStamp], new: list[InputStamp]) -> list[str]:
    """What differs between recorded and current inputs (position by position); [] when the same content."""
    changes = []
    if len(old) != len(new):
        gone = sorted({o.path for o in old} - {n.path for n in new})
        added = sorted({n.path for n in new} - {o.path for o in old})
        changes.append(f"data.paths: {len(old)} input files -> {len(new)}"
                       + (f"; no longer listed: {', '.join(gone)}" if gone else "")
                       + (f"; new: {', '.join(added)}" if added else ""))
    for o, n in zip(old, new, strict=False):
        if o.quick_equal(n):
            continue
        where = n.path if n.path == o.path else f"{o.path} -> {n.path}"
        if o.size != n.size:
            changes.append(f"{where}: {o.size} bytes -> {n.size}")
        elif o.sha256 is None:
            changes.append(f"{where}: modified (mtime changed before its content hash was recorded)")
        elif file_digest(n.path) != o.sha256:
            changes.append(f"{where}: content changed (same size, other SHA-256)")
    return changes


class InputsFingerprint:
    """``<name>.fingerprint.json`` in a run directory: the stamps of its input files."""

    def __init__(self, path: Path, files: list[str]):
        self.path = path
        self.files = list(files)

    def recorded(self) -> list[InputStamp] | None:
        if not self.path.exists():
            return None
        return [InputStamp(**d) for d in json.loads(self.path.read_text())["inputs"]]

    def current(self) -> list[InputStamp]:
        return [InputStamp.of(p) for p in self.files]

    def changes(self) -> list[str] | None:
        """None when nothing is recorded; else what changed (empty: the same inputs)."""
        old = self.recorded()
        return None if old is None else input_changes(old, self.current())

    def matches_quick(self) -> bool:
        old = self.recorded()
        new = self.current()
        return old is not None and len(old) == len(new) and all(o.quick_equal(n) for o, n in zip(old, new, strict=True))

    def record(self) -> None:
        """Write the current stamps, keeping the hash of every input whose content was found unchanged."""
        old = self.recorded() or []
        stamps = self.current()
        for i, s in enumerate(stamps):
            if i < len(old) and old[i].sha256 and old[i].size == s.size:
                s.sha256 = old[i].sha256 if (old[i].quick_equal(s) or file_digest(s.path) == old[i].sha256) else None
        self._write(stamps)

    def complete(self) -> None:
        """After the inputs were read: add their hashes (from that read), refusing a file that changed meanwhile."""
        stamps = self.recorded() or []
        for s in stamps:
            now = InputStamp.of(s.path)
            if not s.quick_equal(now):
                raise ResumeRefused(f"input {s.path} changed while it was being read ({s.size} -> {now.size} bytes, "
                                    "or a new mtime): its outputs may mix old and new content; rerun with "
                                    "data.on_change=redo")
            s.sha256 = s.sha256 or file_digest(s.path)
        self._write(stamps)

    def _write(self, stamps: list[InputStamp]) -> None:
        write_json(self.path, {"inputs": [asdict(s) for s in stamps]})


# --- the gate at the start of a run ---------------------------------------------------------------
@dataclass
class RunGuard:
    """What ``open_run`` checked: rank 0 completes the input fingerprint once the inputs were read."""

    cfg: SelectRunConfig
    out_dir: Path
    inputs: InputsFingerprint

    def inputs_read(self) -> None:
        """Rank 0, after pre-processing or planning read every input: record the inputs' content hashes."""
        if any(s.sha256 is None for s in self.inputs.recorded() or []):
            self.inputs.complete()

    def check_unchanged(self) -> None:
        """Before the merge reads ``data.preprocessed`` windows again: still the files that were scored."""
        if not self.cfg.data.preprocessed:
            return  # the merge reads windows.jsonl, made from the content the fingerprint holds
        if not self.inputs.matches_quick() and (changes := self.inputs.changes()):
            raise ResumeRefused(f"inputs changed during the run: {'; '.join(changes)}; rerun with "
                                "data.on_change=redo")


def _derived_exists(out_dir: Path) -> bool:
    return any((out_dir / name).exists() for name in DERIVED if not name.endswith("fingerprint.json"))


def _redo(out_dir: Path) -> None:
    for name in DERIVED:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".tmp").unlink(missing_ok=True)


def _check_config(cfg: SelectRunConfig, out_dir: Path) -> dict[str, dict[str, Any]]:
    fields = config_fingerprints(cfg)
    for name, f in fields.items():
        check_fingerprint(out_dir, name, f, write=False)
    return fields


def _refuse(out_dir: Path, changes: list[str]) -> None:
    raise ResumeRefused(f"out_dir={out_dir} holds outputs made from other input content ({'; '.join(changes)}): use "
                        "a new out_dir, or data.on_change=redo to delete them and start again")


def _rank0(cfg: SelectRunConfig, out_dir: Path, inputs: InputsFingerprint,
           on_checked: Callable[[], None] | None) -> None:
    fields = _check_config(cfg, out_dir)
    changes = inputs.changes()
    redo = False
    if changes is None and _derived_exists(out_dir):
        log.warning("out_dir=%s has no input fingerprint (made by an older version): its inputs are taken as "
                    "unchanged and fingerprinted now", out_dir)
    elif changes and _derived_exists(out_dir):
        if cfg.data.on_change != OnChange.redo:
            _refuse(out_dir, changes)
        log.warning("inputs changed (%s): data.on_change=redo deletes the outputs made from them", "; ".join(changes))
        redo = True
    if on_checked is not None:
        on_checked()
    if redo:
        _redo(out_dir)
    for name, f in fields.items():
        check_fingerprint(out_dir, name, f)
    inputs.record()  # last: the signal that other ranks may go on


def open_run(cfg: SelectRunConfig, out_dir: Path, rank: int,
             on_checked: Callable[[], None] | None = None) -> RunGuard:
    """Check the config and input fingerprints before any output is written (see the module docstring).

    Rank 0 refuses a change (or redoes, ``data.on_change=redo``), calls ``on_checked`` (the entry point saves
    ``config.yaml`` there, so a refused rerun leaves it untouched), then records the fingerprints. Other ranks
    refuse a config change and wait until rank 0 has recorded the inputs they see.
    """
    inputs = InputsFingerprint(out_dir / "inputs.fingerprint.json", list(cfg.data.paths))
    if rank == 0:
        _rank0(cfg, out_dir, inputs, on_checked)
    else:
        def ready() -> bool:
            if not inputs.matches_quick():
                if cfg.data.on_change == OnChange.refuse and _derived_exists(out_dir) and inputs.changes():
                    _refuse(out_dir, inputs.changes() or [])  # what rank 0 does too: do not wait for it
                return False
            return all((out_dir / f"{n}.fingerprint.json").exists() for n in config_fingerprints(cfg))

        _check_config(cfg, out_dir)
        cfg.shard.wait(ready, f"rank 0 to check the inputs ({inputs.path})")
        _check_config(cfg, out_dir)
    return RunGuard(cfg, out_dir, inputs)
