"""What reading the inputs found beyond skipped records: repairs, category mapping, damaged files.

Shared by the two readers of user input — pre-processing (documents) and the scan of reference-format
windows (``data.preprocessed=true``) — so both count the same things the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from longattn.common.errors import Choice
from longattn.common.io import InputError, InputRecord

log = logging.getLogger(__name__)

__all__ = ["OnError", "read_category", "InputNotes"]


class OnError(Choice):
    skip = "skip"
    """Keep what was read before the damage, count the rest as ``unreadable`` and go on with the next file."""
    fail = "fail"
    """Stop the run at the first damaged file, naming it."""


def read_category(value: Any, default: str) -> tuple[str | None, str | None]:
    """(category, None), or (None, why) for a record whose category cannot be used.

    A string is stripped and lower-cased (``ARXIV`` and `` arxiv`` are ``arxiv``); an integer becomes its
    decimal digits (``0`` -> ``"0"``); absent, null or blank means ``default``. Anything else — a boolean, a
    float, a list, an object — makes the record malformed rather than guessing a name for it.
    """
    if value is None:
        return default, None
    if isinstance(value, str):
        return (value.strip().lower() or default), None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    return None, f"'category' is {type(value).__name__} ({value!r:.60}), not a string"


@dataclass
class InputNotes:
    """Counters of what was repaired while reading, and the files read only in part."""

    decode_errors: int = 0
    """Records whose line held invalid UTF-8 (read with U+FFFD in place of the bad bytes)."""
    bom: int = 0
    """Files that started with a UTF-8 byte order mark (dropped)."""
    category_map: dict[str, dict[str, Any]] = field(default_factory=dict)
    """repr of a category as written -> {"category": what it became, "records": how many}, when they differ."""
    unreadable: list[str] = field(default_factory=list)
    """``file:line: error`` of every damaged file (the records before that line were used)."""

    def read(self, rec: InputRecord, on_error: OnError) -> None:
        """Count what this record's reading repaired; a damaged file is named, or stops the run."""
        self.decode_errors += rec.decode_error
        self.bom += rec.bom
        if rec.unreadable:
            if on_error == OnError.fail:
                raise InputError(f"{rec.where}: {rec.error} (data.on_error=fail; data.on_error=skip keeps the "
                                 "records before the damage and goes on)")
            self.unreadable.append(f"{rec.where}: {rec.error}")
            log.warning("damaged input %s: %s; the records before this line are used, the rest is counted as "
                        "unreadable", rec.where, rec.error)

    def category(self, rec: InputRecord, default: str) -> tuple[str | None, str | None]:
        """The record's normalised category (see ``read_category``), noting every mapping."""
        raw = (rec.record or {}).get("category")
        category, why = read_category(raw, default)
        if category is not None and raw is not None and raw != category:
            entry = self.category_map.setdefault(repr(raw), {"category": category, "records": 0})
            entry["records"] += 1
        return category, why

    def repaired(self) -> dict[str, int]:
        return {"decode_errors": self.decode_errors, "bom": self.bom,
                "category_normalised": sum(e["records"] for e in self.category_map.values())}

    def log_summary(self) -> None:
        if self.category_map:
            log.warning("categories normalised (stripped, lower-case; integers as digits): %s",
                        mapping_text(self.category_map))
        if self.decode_errors:
            log.warning("%d records held invalid UTF-8 (read with U+FFFD in place of the bad bytes)",
                        self.decode_errors)

    def to_dict(self) -> dict[str, Any]:
        return {"repaired": self.repaired(), "category_map": self.category_map, "unreadable": self.unreadable}


def mapping_text(category_map: dict[str, dict[str, Any]]) -> str:
    """``'ARXIV' -> 'arxiv' (3 records), 0 -> '0' (1 record)``."""
    items = sorted(category_map.items(), key=lambda kv: -kv[1]["records"])
    return ", ".join(f"{raw} -> {e['category']!r} ({e['records']} record{'s' * (e['records'] != 1)})"
                     for raw, e in items)
