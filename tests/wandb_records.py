"""Read the records of an offline W&B run (``run-*.wandb``): a LevelDB-style log of protobuf ``Record``s.

wandb >= 0.19 writes these files from its Go core and ships no Python reader; the format is a 7-byte header
(``:W&B``, magic, version) then 32 KiB blocks of records (crc32 4 bytes, length 2, type 1: full/first/middle/
last). Tests read them to check what a run really logged, not only that a folder exists.
"""

from __future__ import annotations

import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (FULL, FIRST) else parts + chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def summary(recs: list) -> dict:
    """Logged history keys and summary keys, the run's group / job type, and logged artifacts."""
    import json

    history, summ, arts, run = {}, {}, [], None
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            for item in r.history.item:
                history[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in r.summary.update:
                summ[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            run = r.run
        elif kind == "artifact":
            arts.append((r.artifact.name, r.artifact.type))
    return {"history": history, "summary": summ, "artifacts": arts,
            "group": run.run_group if run else None, "job_type": run.job_type if run else None}
