"""What a selection run cost, per rank and device, and what the paper's corpus would cost at that rate.

``metrics.json`` ``cost``: scoring windows/s per rank and in total, the devices, device-hours (GPU-hours on a
GPU, process-hours on CPU) per billion window tokens and projected to the paper's 36B tokens
(LongABC-32K-Raw, docs/method.md §4); pre-processing in core-hours (CPU time of the reading process and its
tokeniser workers) per billion document tokens; and the paper's Table 5 beside them. At a window length
other than 32k the projection is linear in tokens, as ``longattn.experiments.tables.cost_rows`` does
(LongAttn's attention grows faster than linearly in the length).
"""

from __future__ import annotations

from typing import Any

__all__ = ["scoring_cost", "preprocess_cost", "paper_table5", "cost_dashboard", "cost_metrics"]


def _paper() -> tuple[list[tuple[str, str, float]], float, int]:
    from longattn.experiments.tables import PAPER_COST, PAPER_TOKENS, PAPER_WINDOW

    return PAPER_COST, PAPER_TOKENS, PAPER_WINDOW


def _per_billion(seconds: float, tokens: float, prefix: str = "") -> dict[str, float | None]:
    paper_tokens = _paper()[1]
    hours = seconds / 3600 / (tokens / 1e9) if tokens and seconds else None
    return {f"{prefix}hours_per_billion_tokens": hours,
            f"{prefix}hours_36B_tokens": None if hours is None else hours * paper_tokens / 1e9}


def scoring_cost(timings: list[dict[str, Any]], ranks: dict[str, dict[str, Any]], window_length: int) -> dict[str, Any]:
    """From the shards' timing records (``rank``, ``device``, ``windows``, ``score_seconds``) and the ranks'
    records (``device``): per rank, per device and in total. Total windows/s adds up the ranks' rates
    (ranks run at the same time); hours add up the ranks' scoring time (device time, not wall time)."""
    per_rank: dict[str, dict[str, Any]] = {}
    for t in timings:
        key = str(t.get("rank", "?"))
        r = per_rank.setdefault(key, {"device": t.get("device") or ranks.get(key, {}).get("device"), "shards": 0,
                                      "windows": 0, "seconds": 0.0})
        r["shards"] += 1
        r["windows"] += int(t["windows"])
        r["seconds"] += float(t["score_seconds"])
    devices: dict[str, dict[str, Any]] = {}
    for r in per_rank.values():
        r["windows_per_s"] = r["windows"] / r["seconds"] if r["seconds"] else None
        d = devices.setdefault(str(r["device"]), {"ranks": 0, "windows": 0, "seconds": 0.0})
        d["ranks"] += 1
        d["windows"] += r["windows"]
        d["seconds"] += r["seconds"]
    for d in devices.values():
        d["seconds_per_window"] = d["seconds"] / d["windows"] if d["windows"] else None
        d.update(_per_billion(d["seconds"], d["windows"] * window_length, "device_"))
    windows = sum(r["windows"] for r in per_rank.values())
    seconds = sum(r["seconds"] for r in per_rank.values())
    return {"per_rank": dict(sorted(per_rank.items(), key=lambda kv: (len(kv[0]), kv[0]))), "devices": devices,
            "windows": windows, "tokens": windows * window_length, "device_hours": seconds / 3600,
            "windows_per_s": sum(r["windows_per_s"] or 0.0 for r in per_rank.values()),
            **_per_billion(seconds, windows * window_length, "device_")}


def preprocess_cost(pre: dict[str, Any]) -> dict[str, Any]:
    """From ``preprocess.json``: tokens/s per core (CPU seconds of the rank and its workers), per rank too."""
    tokens = sum((pre.get("tokens_in") or {}).values())
    cpu, wall = float(pre.get("cpu_seconds") or 0.0), float(pre.get("seconds") or 0.0)
    per_rank = {}
    for r, d in (pre.get("ranks") or {}).items():
        per_rank[r] = {**d, "tokens_per_s": d["tokens"] / d["seconds"] if d["seconds"] else None,
                       "tokens_per_s_per_core": d["tokens"] / d["cpu_seconds"] if d["cpu_seconds"] else None}
    return {"tokens": tokens, "core_seconds": cpu, "seconds": wall, "ranks": len(per_rank), "per_rank": per_rank,
            "tokens_per_s_per_core": tokens / cpu if cpu else None,
            "tokens_per_s": sum(r["tokens_per_s"] or 0.0 for r in per_rank.values()),
            **_per_billion(cpu, tokens, "core_")}


def paper_table5() -> list[dict[str, Any]]:
    """The paper's Table 5 (H800 GPU-hours for 36B tokens) in the same units as this run's numbers."""
    cost, tokens, window = _paper()
    return [{"method": method, "model": model, "device": "H800", "windows": round(tokens / window),
             "window_length": window, "device_hours_36B_tokens": hours,
             "device_hours_per_billion_tokens": hours / (tokens / 1e9),
             "seconds_per_window": hours * 3600 / (tokens / window)} for method, model, hours in cost]


def cost_dashboard(timings: list[dict[str, Any]], ranks: dict[str, dict[str, Any]], pre: dict[str, Any],
                   window_length: int) -> dict[str, Any]:
    return {"window_length": window_length, "paper_tokens": _paper()[1],
            "scoring": scoring_cost(timings, ranks, window_length),
            "preprocess": preprocess_cost(pre) if pre else None, "paper_table5": paper_table5()}


def cost_metrics(cost: dict[str, Any]) -> dict[str, Any]:
    """Flat ``select/cost/...`` numbers for metrics.jsonl and W&B."""
    if not cost:
        return {}
    s = cost["scoring"]
    out: dict[str, Any] = {"select/cost/windows_per_s": s["windows_per_s"],
                           "select/cost/device_hours_per_billion_tokens": s["device_hours_per_billion_tokens"],
                           "select/cost/device_hours_36B_tokens": s["device_hours_36B_tokens"],
                           "select/cost/devices": ", ".join(sorted(s["devices"]))}
    for r, d in s["per_rank"].items():
        out[f"select/cost/rank{r}/windows_per_s"] = d["windows_per_s"]
    if p := cost.get("preprocess"):
        out.update({"select/cost/preprocess/tokens_per_s_per_core": p["tokens_per_s_per_core"],
                    "select/cost/preprocess/core_hours_per_billion_tokens": p["core_hours_per_billion_tokens"],
                    "select/cost/preprocess/core_hours_36B_tokens": p["core_hours_36B_tokens"]})
    return {k: v for k, v in out.items() if v is not None}
