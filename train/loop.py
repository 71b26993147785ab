"""The training run: set-up (process groups, model, optimizer, data), the step loop, checkpoints, export.

Building blocks are megatron-core's (``train.megatron_backend``); this module holds the order of things.
Data order is a pure function of the step: step ``s`` reads samples ``[s*GB, (s+1)*GB)`` of the blended
dataset, split over data-parallel ranks, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longattn.common.models import load_tokenizer
from longattn.common.tracking import MetricsLogger
from train import megatron_backend as B
from train.config import TrainRunConfig, derive
from train.convert import from_te_names, gather_tp, hf_to_mcore, mcore_to_hf, shard_tp, to_te_names
from train.data import blend_weights, build_sources
from train.hf import flops_per_token, initial_weights, llama_config, save_hf, shape_of

log = logging.getLogger(__name__)


@dataclass
class RunState:
    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Training tokens consumed (all data-parallel ranks)."""


# ------------------------------------------------------------------------------------------------ data
class StepBatches:
    """Micro-batches of one step for this data-parallel rank, as megatron's schedule pulls them."""

    def __init__(self, dataset: Any, cfg: TrainRunConfig, step: int, device: torch.device):
        t = cfg.train
        per_rank = t.micro_batch_size * t.grad_accum
        self.start = step * t.global_batch_size + B.dp_rank() * per_rank
        self.dataset, self.mbs, self.device, self.i = dataset, t.micro_batch_size, device, 0

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.start + self.i * self.mbs
        self.i += 1
        samples = [self.dataset[j] for j in range(first, first + self.mbs)]
        batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
        return B.context_parallel_slice({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})


def build_dataset(cfg: TrainRunConfig, tokenizer: Any, vocab_size: int, rank: int) -> Any:
    """Indexed datasets (tokenised on rank 0, others wait) blended with the Table 7 weights."""
    data_dir = Path(cfg.data.cache_dir or Path(cfg.out_dir) / "data")
    prefixes = _sources_built_on_rank0(cfg, data_dir, vocab_size, rank)
    weights = blend_weights(cfg.data.weights, prefixes)
    if rank == 0:
        dropped = sorted(set(cfg.data.weights) - set(weights))
        log.info("data mix (renormalised over the sources present%s): %s",
                 f"; absent: {', '.join(dropped)}" if dropped else "",
                 ", ".join(f"{k} {100 * w:.1f}%" for k, w in weights.items()))
    t = cfg.train
    return B.build_blended_dataset(
        [prefixes[k] for k in weights], list(weights.values()), num_samples=t.steps * t.global_batch_size,
        seq_length=t.seq_length, seed=t.seed, vocab_size=vocab_size, eod=tokenizer.eos_token_id,
        cache_dir=data_dir / "index_cache")


def _sources_built_on_rank0(cfg: TrainRunConfig, data_dir: Path, vocab_size: int, rank: int) -> dict[str, str]:
    """Rank 0 tokenises; the others poll for its ``ready.json`` instead of waiting in a collective, whose
    timeout (minutes) is far shorter than tokenising billions of tokens."""
    ready = data_dir / "ready.json"
    if rank == 0:
        ready.unlink(missing_ok=True)
    dist.barrier()  # nobody reads a ready.json left by an earlier run
    if rank == 0:
        prefixes = build_sources(cfg.data, cfg.model, data_dir, vocab_size)
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(json.dumps(prefixes))
        tmp.replace(ready)
        return prefixes
    while not ready.is_file():
        time.sleep(2.0)
    return json.loads(ready.read_text())


def _loss(loss_mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    mask = loss_mask.float().view(-1)
    loss = (per_token.float().view(-1) * mask).sum() / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"loss": loss.detach().clone()}


def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b["labels"])
    return out, partial(_loss, b["loss_mask"])


# ------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(out_dir: Path) -> Path | None:
    marker = out_dir / "checkpoints" / "latest"
    return out_dir / "checkpoints" / marker.read_text().strip() if marker.is_file() else None


def save(out_dir: Path, opt: B.Optim, state: RunState, rank: int) -> None:
    """Distributed checkpoint + per-rank RNG state; ``latest`` is written last, so a crash mid-save is harmless."""
    name = f"step_{state.step:08d}"
    path = out_dir / "checkpoints" / name
    B.save_checkpoint(path, opt, {"state": asdict(state)})
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()},
               path / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (out_dir / "checkpoints" / "latest").write_text(name + "\n")
        log.info("saved checkpoint %s", path)


def resume(path: Path, opt: B.Optim, rank: int) -> RunState:
    common = B.load_checkpoint(path, opt)
    rng = torch.load(path / f"rng_rank{rank:05d}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rank == 0:
        log.info("resumed from %s (step %d)", path, common["state"]["step"])
    return RunState(**common["state"])


def load_initial(model: torch.nn.Module, cfg: TrainRunConfig, conf: Any, padded_vocab: int) -> None:
    full = hf_to_mcore(initial_weights(cfg.model, conf), shape_of(conf), padded_vocab)
    local = shard_tp(full, cfg.parallel.tensor, B.tp_rank())
    B.load_local_state_dict(model, to_te_names(local) if B.uses_te_names() else local)


def export(out_dir: Path, opt: B.Optim, conf: Any, tokenizer: Any, rank: int, bf16: bool = False) -> None:
    """Gather the tensor-parallel shards and write ``out_dir/hf`` (from global rank 0)."""
    local = from_te_names(B.local_state_dict(opt.ddp))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(B.parallel_state.get_tensor_model_parallel_world_size())]
    for name, w in local.items():
        parts = [torch.empty_like(w) for _ in shards]
        dist.all_gather(parts, w.contiguous(), group=B.tp_group())
        for sd, p in zip(shards, parts, strict=True):
            sd[name] = p
    if rank == 0:  # bf16 like the training weights (16 GB for 8B); fp32 on the CPU path
        dtype = torch.float32 if B.ON_CPU or not bf16 else torch.bfloat16
        save_hf(out_dir / "hf", conf, mcore_to_hf(gather_tp(shards), shape_of(conf)), tokenizer, dtype)
    dist.barrier()


# -------------------------------------------------------------------------------------------------- run
def build_model(conf: Any, cfg: TrainRunConfig) -> tuple[torch.nn.Module, Any, int]:
    """The megatron GPTModel of HF config ``conf`` (this rank's shard): (model, TransformerConfig, padded vocab)."""
    padded = B.padded_vocab_size(conf.vocab_size, cfg.parallel.tensor)
    spec = B.ModelSpec(shape=shape_of(conf), hidden_size=conf.hidden_size, ffn_hidden_size=conf.intermediate_size,
                       rope_theta=conf.rope_parameters["rope_theta"], rms_norm_eps=conf.rms_norm_eps,
                       padded_vocab=padded, max_seq_length=cfg.train.seq_length)
    tconf = B.transformer_config(spec, dropout=cfg.train.dropout, bf16=cfg.train.bf16)
    return B.build_model(spec, tconf), tconf, padded


@contextlib.contextmanager
def distributed_scope(cfg: TrainRunConfig) -> Iterator[tuple[int, int]]:
    """Process groups for the run (rank, world size), inside the CPU compatibility scope without CUDA."""
    with contextlib.ExitStack() as stack:
        if B.ON_CPU:
            from train import cpu_compat

            stack.enter_context(cpu_compat.cpu_device_scope())
        p = cfg.parallel
        rank, world = B.init_distributed(p.tensor, p.pipeline, p.context, cfg.train.seed)
        stack.callback(B.destroy_distributed)
        yield rank, world


def run_train(cfg: TrainRunConfig) -> dict[str, Any]:
    """The whole run in this process (one rank of a torchrun job, or world size 1)."""
    with distributed_scope(cfg) as (rank, world):
        return _run(cfg, rank, world)


def _run(cfg: TrainRunConfig, rank: int, world: int) -> dict[str, Any]:
    derive(cfg, world)
    t, out_dir = cfg.train, Path(cfg.out_dir)
    tokenizer = load_tokenizer(cfg.model)
    conf = llama_config(cfg.model, tokenizer, t.seq_length)
    model, tconf, padded = build_model(conf, cfg)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        load_initial(model, cfg, conf, padded)
    opt = B.build_optimizer(model, tconf, cfg.schedule, steps=t.steps,
                            distributed_optimizer=cfg.parallel.distributed_optimizer)
    state = resume(ckpt, opt, rank) if ckpt is not None else RunState()
    dataset = build_dataset(cfg, tokenizer, conf.vocab_size, rank)
    if rank == 0:
        _drop_metrics_after(out_dir / "metrics.jsonl", state.step)
    metrics = MetricsLogger(out_dir, cfg.wandb, job_type="train", rank=rank,
                            config={"global_batch_size": t.global_batch_size, "steps": t.steps,
                                    "data_parallel": cfg.parallel.data})
    if rank == 0:
        log.info("training %s: %d steps x %d sequences x %d tokens (DP %d, TP %d, PP %d, CP %d), from step %d",
                 cfg.model.name, t.steps, t.global_batch_size, t.seq_length, cfg.parallel.data,
                 cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context, state.step)
    try:
        _loop(cfg, opt, dataset, state, metrics, rank, flops_per_token(conf, t.seq_length) / world)
        if state.step >= t.steps and t.export_hf:
            export(out_dir, opt, conf, tokenizer, rank, bf16=t.bf16)
    finally:
        metrics.close()
    return {"step": state.step, "tokens": state.tokens}


def _loop(cfg: TrainRunConfig, opt: B.Optim, dataset: Any, state: RunState, metrics: MetricsLogger,
          rank: int, flops_per_token_per_device: float) -> None:
    t, out_dir = cfg.train, Path(cfg.out_dir)
    device = torch.device("cpu") if B.ON_CPU else torch.device("cuda", torch.cuda.current_device())
    step_tokens = t.global_batch_size * t.seq_length
    stop = t.steps if t.max_steps_this_run is None else min(t.steps, state.step + t.max_steps_this_run)
    opt.ddp.train()
    while state.step < stop:
        t0 = time.perf_counter()
        lr = B.current_lr(opt)
        losses, grad_norm, ok = B.train_step(opt, forward_step, StepBatches(dataset, cfg, state.step, device),
                                             num_microbatches=t.grad_accum, seq_length=t.seq_length,
                                             micro_batch_size=t.micro_batch_size)
        loss = _mean_loss(losses)
        dt = time.perf_counter() - t0
        state.step, state.tokens = state.step + 1, state.tokens + step_tokens
        tps = step_tokens / dt
        row = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm or 0.0), "tokens_per_s": tps,
               "mfu": flops_per_token_per_device * tps / (t.peak_tflops * 1e12), "tokens": state.tokens,
               "skipped": not ok}
        metrics.log(row, step=state.step)
        if rank == 0 and (state.step % t.log_every == 0 or state.step == stop):
            log.info("step %d/%d | loss %.4f | lr %.3g | grad norm %.3f | %.0f tokens/s | MFU %.1f%%",
                     state.step, t.steps, loss, lr, row["grad_norm"], tps, 100 * row["mfu"])
        if state.step % t.save_every == 0 or state.step == stop:
            save(out_dir, opt, state, rank)


def _drop_metrics_after(path: Path, step: int) -> None:
    """Rows logged after the checkpoint we resume from are re-run: drop them so each step has one row."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
    if len(kept) != len(rows):
        path.write_text("".join(kept))
        log.info("metrics.jsonl: dropped %d rows after step %d (re-run after resume)", len(rows) - len(kept), step)


def _mean_loss(losses: list[dict]) -> float:
    """Mean micro-batch loss, averaged over data- and context-parallel ranks."""
    value = torch.tensor([sum(float(x["loss"]) for x in losses), float(len(losses))], dtype=torch.float64,
                         device="cpu" if B.ON_CPU else "cuda")
    dist.all_reduce(value, group=B.loss_group())
    return float(value[0] / value[1]) if value[1] else math.nan
