"""Data preparation, its own step (``longattn-train ... train.prepare_only=true``): everything a training run
reads, tokenised and indexed on CPUs before any GPU is allocated.

1. **Plan.** One pass over ``selected.jsonl`` counts windows per category and notes the byte offset of every
   unit of ``data.prepare.unit_records`` windows. The mix (Table 7 weights renormalised over the sources
   present) over ``steps x global_batch`` samples fixes how many samples each source gives, so a short source
   needs ``samples x seq_length x (1 + short_margin)`` tokens: it is read and tokenised only that far.
2. **Units.** Units are dealt round-robin to ``data.prepare.world_size`` processes (a CPU SLURM array), each
   tokenising its own with ``data.workers`` processes (``train.tokenize``). A unit is finished when its
   done marker holds the key of its inputs (file size and mtime, tokenizer, BOS, length), so a rerun or
   a resumed array element skips it.
3. **Merge.** The process that finds every rank finished fills any gap, concatenates the units into one
   indexed dataset per source, builds the index caches of the blend and writes ``samples_preview.jsonl``
   and ``prepared.json`` (the manifest a training run reads; ``build_once`` keyed by a digest of the inputs).

A training run calls ``ensure_prepared``: with prepared data it reads the manifest; otherwise it may merge
finished units, but it tokenises only where ``data.prepare.in_run`` allows (by default, only without CUDA).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from longattn.common.distributed import build_once
from longattn.common.errors import ConfigError
from longattn.common.io import json_digest, write_json
from longattn.common.models import load_tokenizer
from train.config import BosMode, TrainRunConfig, data_dir, short_sources
from train.tokenize import TokenSpec
from train.units import (
    SHORT,
    WINDOWS,
    Input,
    merge_source,
    tokenize_share,
    unit_stats,
    units_for_merge,
)

log = logging.getLogger(__name__)

class NotPrepared(ConfigError):
    """The run needs tokenising that this machine must not do (a GPU node)."""


# ---------------------------------------------------------------------------------------------- keys
def token_spec(cfg: TrainRunConfig, tok: Any) -> TokenSpec:
    bos = None
    if cfg.data.bos == BosMode.prepend:
        if tok.bos_token_id is None:
            raise ConfigError(f"data.bos=prepend but the tokenizer of model={cfg.model.name} has no BOS token: "
                              "set data.bos=none")
        bos = int(tok.bos_token_id)
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer of model={cfg.model.name} has no EOS token (the end-of-document mark)")
    return TokenSpec(bos_id=bos, eos_id=int(tok.eos_token_id), seq_length=cfg.train.seq_length,
                     text_key=cfg.data.text_key, vocab_size=len(tok))


def check_tokenizer(cfg: TrainRunConfig) -> TokenSpec:
    """Fail early (naming data.bos) if the tokenizer lacks what the samples need."""
    return token_spec(cfg, load_tokenizer(cfg.model))


def _fingerprint(path: str) -> dict[str, Any]:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def inputs(cfg: TrainRunConfig, spec: TokenSpec, tok: Any) -> list[Input]:
    """The selection and the short sources, each keyed by its file, the tokenizer and the unit layout."""
    tok_id = {"name": getattr(tok, "name_or_path", ""), "len": len(tok), "model": cfg.model.tokenizer or cfg.model.path}
    common = {"spec": asdict(spec), "tokenizer": tok_id, "unit_records": cfg.data.prepare.unit_records}
    found = []
    if cfg.data.selected:
        path = str(Path(cfg.data.selected) / "selected.jsonl")
        found.append(Input(WINDOWS, "selected", path, json_digest({**common, "kind": WINDOWS, **_fingerprint(path)})))
    for name, path in short_sources(cfg.data).items():
        found.append(Input(SHORT, name, path, json_digest({**common, "kind": SHORT, **_fingerprint(path)})))
    return found


def prepared_key(cfg: TrainRunConfig, ins: list[Input]) -> str:
    """What a prepared data directory was built for: inputs, mix, number of samples, margin and seed."""
    t = cfg.train
    return json_digest({"inputs": [asdict(i) for i in ins], "weights": dict(cfg.data.weights),
                    "samples": t.steps * t.global_batch_size, "seq_length": t.seq_length, "seed": t.seed,
                    "margin": cfg.data.prepare.short_margin, "preview": cfg.data.preview}, 16)


# ---------------------------------------------------------------------------------------------- plan
def scan_windows(path: str, unit_records: int) -> dict[str, Any]:
    """Windows per category and the byte offset of every unit (one pass, no JSON parsing of the texts:
    ``selected.jsonl`` lines end with the category, as longattn-select writes them)."""
    counts: Counter = Counter()
    offsets, n, pos = [], 0, 0
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                if n % unit_records == 0:
                    offsets.append(pos)
                counts[_category_of(raw)] += 1
                n += 1
            pos += len(raw)
    return {"categories": dict(counts), "windows": n, "offsets": offsets}


def _category_of(raw: bytes) -> str:
    head, sep, tail = raw.rpartition(b'"category":')
    if sep:
        try:
            value = json.loads(tail.strip().rstrip(b"}").strip())
            return str(value) if value else "default"
        except json.JSONDecodeError:
            pass
    return str(json.loads(raw).get("category") or "default")


@dataclass
class MixPlan:
    """The sources of the blend in order, their weights, samples and (short) token budgets."""

    weights: dict[str, float]
    samples: dict[str, int]
    budgets: dict[str, int]
    dropped: dict[str, str]


def mix_plan(cfg: TrainRunConfig, categories: dict[str, int]) -> MixPlan:
    from train.samples import samples_per_source

    d, t = cfg.data, cfg.train
    present = list(categories) + list(short_sources(d))
    dropped = {n: "no blend weight (data.weights)" for n in present if d.weights.get(n, 0.0) <= 0}
    order = [n for n in d.weights if n in present and n not in dropped]
    order += sorted(n for n in present if n not in order and n not in dropped)
    if not order:
        raise ConfigError(f"no source with a positive weight: sources {present}, data.weights={dict(d.weights)}")
    total = sum(d.weights[n] for n in order)
    weights = {n: d.weights[n] / total for n in order}
    n_samples = t.steps * t.global_batch_size
    samples = dict(zip(order, samples_per_source(list(weights.values()), n_samples), strict=True))
    samples = {n: max(s, 1) for n, s in samples.items()}  # every blended dataset holds >= 1 sample
    budgets = {n: math.ceil((samples[n] * t.seq_length + 1) * (1 + d.prepare.short_margin))
               for n in short_sources(d) if n in weights}
    return MixPlan(weights, samples, budgets, dropped)


def finalize(cfg: TrainRunConfig, spec: TokenSpec, ins: list[Input], scan: dict | None, plan: MixPlan,
             root: Path) -> dict[str, Any]:
    """Merged datasets + manifest + index caches + ``samples_preview.jsonl`` (all units must be done)."""
    from train.samples import build_mix

    t, c = cfg.train, cfg.data.prepare.unit_records
    datasets: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, int]] = {}
    for inp in ins:
        markers, missing = units_for_merge(inp, root, scan, plan.budgets, c)
        if missing:
            raise NotPrepared(f"data for {inp.name} is not prepared: units {missing[:10]} of {inp.unit_dir(root)} "
                              "are missing")
        stats[inp.name] = unit_stats(markers)
        names = [n for n in plan.weights if (n in (scan or {}).get("categories", {}) if inp.kind == WINDOWS
                                             else n == inp.name)]
        for name in names:
            datasets[name] = {"kind": inp.kind, **merge_source(name, inp, root, markers, spec.dtype)}
            if not datasets[name]["docs"]:
                raise ConfigError(f"source {name} ({inp.path}) holds no readable text under data.text_key="
                                  f"{cfg.data.text_key}")
    datasets = {n: datasets[n] for n in plan.weights}  # the blend's order
    for name, d in datasets.items():
        d |= {"weight": plan.weights[name], "samples": plan.samples[name]}
        if d["kind"] == WINDOWS and d["samples"] > d["docs"]:
            log.warning("data: %s has %d selected windows, the mix takes %d samples from it: windows repeat "
                        "(%.2f epochs)", name, d["docs"], d["samples"], d["samples"] / d["docs"])
        elif d["kind"] == SHORT and d["tokens"] < plan.budgets[name] / (1 + cfg.data.prepare.short_margin):
            log.warning("data: %s has %d tokens, the mix takes %d samples of %d: documents repeat", name,
                        d["tokens"], d["samples"], t.seq_length)
    manifest = {"datasets": datasets, "num_samples": t.steps * t.global_batch_size, "seq_length": t.seq_length,
                "seed": t.seed, "vocab_size": spec.vocab_size, "eod": spec.eos_id, "bos": str(cfg.data.bos),
                "dropped": plan.dropped, "stats": stats,
                "windows": (scan or {}).get("categories", {})}
    mix = build_mix(manifest, root / "index_cache")  # builds and caches GPTDataset indices here, on CPU
    write_preview(mix, root / "samples_preview.jsonl", cfg.data.preview)
    log.info("data: prepared %d samples from %s (preview: %s)", len(mix),
             ", ".join(f"{n} {100 * w:.1f}% ({datasets[n]['docs']} docs)" for n, w in plan.weights.items()),
             root / "samples_preview.jsonl")
    return manifest


def write_preview(mix: Any, path: Path, n: int) -> None:
    from longattn.common.io import atomic_writer

    with atomic_writer(path) as f:
        for i in range(min(n, len(mix))):
            f.write(json.dumps(mix.describe(i), ensure_ascii=False) + "\n")


# -------------------------------------------------------------------------------------------- entry points
@dataclass
class Context:
    """Everything preparation derives from the config (cheap: no scan, no tokenising)."""

    spec: TokenSpec
    inputs: list[Input]
    key: str
    root: Path

    @property
    def marker(self) -> Path:
        return self.root / "prepared.json"


def context(cfg: TrainRunConfig, tok: Any | None = None) -> Context:
    tok = tok or load_tokenizer(cfg.model)
    spec = token_spec(cfg, tok)
    ins = inputs(cfg, spec, tok)
    return Context(spec, ins, prepared_key(cfg, ins), data_dir(cfg))


def prepared_manifest(ctx: Context) -> dict[str, Any] | None:
    try:
        marker = json.loads(ctx.marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker["value"] if marker.get("key") == ctx.key else None


def _scan(ctx: Context, cfg: TrainRunConfig) -> dict[str, Any] | None:
    """The scan of selected.jsonl, made by the first process that needs it and kept (every preparation
    rank may make it: one read of the file, which it would otherwise wait for)."""
    sel = next((i for i in ctx.inputs if i.kind == WINDOWS), None)
    if sel is None:
        return None
    marker = ctx.root / "plan" / f"scan-{sel.key}.json"
    marker.parent.mkdir(parents=True, exist_ok=True)
    return build_once(marker, sel.key, lambda: scan_windows(sel.path, cfg.data.prepare.unit_records), rank=0)


def prepare(cfg: TrainRunConfig, ctx: Context, *, rank: int = 0, world: int = 1, tokenize: bool = True
            ) -> dict[str, Any] | None:
    """Prepare this rank's share; the process that finds every rank finished merges and returns the manifest
    (None for the others). ``tokenize=False`` only merges finished units (or raises ``NotPrepared``)."""
    scan = _scan(ctx, cfg)
    plan = mix_plan(cfg, (scan or {}).get("categories", {}))
    if tokenize:
        tokenize_share(cfg, ctx.spec, ctx.inputs, scan, plan.budgets, ctx.root, rank, world)
    if world > 1:
        (ctx.root / "plan").mkdir(parents=True, exist_ok=True)
        write_json(ctx.root / "plan" / f"rank-{ctx.key}-{rank:05d}-of-{world:05d}.json", {"done": True})
        finished = len(list((ctx.root / "plan").glob(f"rank-{ctx.key}-*-of-{world:05d}.json")))
        if finished < world:
            log.info("data prep rank %d/%d done; the last rank to finish merges (%d/%d finished)", rank, world,
                     finished, world)
            return None
        try:  # two ranks may finish at once: one merges (a rerun with world_size=1 merges if it died)
            os.close(os.open(ctx.root / "plan" / f"merge-{ctx.key}.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            log.info("data prep rank %d/%d done; another rank merges", rank, world)
            return None
    if tokenize and world > 1:  # fill gaps: units a rank estimated as unneeded, or of a rank that died
        tokenize_share(cfg, ctx.spec, ctx.inputs, scan, plan.budgets, ctx.root, 0, 1)
    manifest = finalize(cfg, ctx.spec, ctx.inputs, scan, plan, ctx.root)
    write_json(ctx.marker, {"key": ctx.key, "value": manifest})
    return manifest


def missing_work(cfg: TrainRunConfig, world_size: int) -> str:
    """What a training run of ``world_size`` processes would have to tokenise ('' when nothing)."""
    import copy

    from train.config import derive

    cfg = copy.deepcopy(cfg)
    derive(cfg, world_size)
    ctx = context(cfg)
    if prepared_manifest(ctx) is not None:
        return ""
    scan = _scan(ctx, cfg)
    plan = mix_plan(cfg, (scan or {}).get("categories", {}))
    missing = {i.name: units_for_merge(i, ctx.root, scan, plan.budgets, cfg.data.prepare.unit_records)[1] for i in ctx.inputs}
    return ", ".join(f"{n}: {len(m)} units" for n, m in missing.items() if m)


def run_prepare(cfg: TrainRunConfig, world_size: int) -> dict[str, Any] | None:
    """``train.prepare_only=true``: this process's share of the preparation (rank ``data.prepare.rank``)."""
    from train.config import derive

    derive(cfg, world_size)
    ctx = context(cfg)
    p = cfg.data.prepare
    log.info("data prep rank %d/%d for %d samples of %d tokens into %s", p.rank, p.world_size,
             cfg.train.steps * cfg.train.global_batch_size, cfg.train.seq_length, ctx.root)
    return prepare(cfg, ctx, rank=p.rank, world=p.world_size, tokenize=True)


def tokenizing_allowed(cfg: TrainRunConfig) -> bool:
    allowed = cfg.data.prepare.in_run
    return not torch.cuda.is_available() if allowed is None else allowed


def ensure_prepared(cfg: TrainRunConfig, rank: int) -> dict[str, Any]:
    """The manifest of the prepared data for this run: read, or merged / tokenised once on rank 0."""
    ctx = context(cfg)
    found = prepared_manifest(ctx)
    if found is not None:
        return found
    allowed = tokenizing_allowed(cfg)
    try:
        return build_once(ctx.marker, ctx.key, lambda: prepare(cfg, ctx, tokenize=allowed), rank=rank)
    except NotPrepared as e:
        raise NotPrepared(f"{e}. Prepare the data first on CPU nodes (this run never tokenises on GPUs): "
                          "rerun the same command with train.prepare_only=true (shard it with "
                          "data.prepare.world_size / data.prepare.rank, see docs/train.md), or set "
                          "data.prepare.in_run=true") from None
