"""The training run: set-up (process groups, prepared data, model, optimizer), the step loop, checkpoints and
the export at the end.

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
from train.config import TrainRunConfig, data_dir, derive
from train.convert import hf_to_mcore_shard, to_te_names
from train.export import TEMPLATE, export_checkpoint
from train.hf import flops_per_token, initial_weights, llama_config, rope_theta, shape_of
from train.prepare import ensure_prepared
from train.samples import build_mix

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

    def __init__(self, dataset: Any, cfg: TrainRunConfig, step: int, device: torch.device, te: bool):
        t = cfg.train
        per_rank = t.micro_batch_size * t.grad_accum
        self.start = step * t.global_batch_size + B.dp_rank() * per_rank
        self.dataset, self.mbs, self.device, self.te, self.i = dataset, t.micro_batch_size, device, te, 0

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        first = self.start + self.i * self.mbs
        self.i += 1
        samples = [self.dataset[j] for j in range(first, first + self.mbs)]
        batch = {k: torch.stack([s[k] for s in samples]).to(self.device, non_blocking=True) for k in samples[0]}
        return B.model_inputs(batch, self.te)


def _loss(loss_mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the micro-batch's trained tokens. With context parallelism each rank holds part of the
    sequence: its sum is divided by the token count of the whole context-parallel group (megatron's schedule
    then multiplies by the group size, and DDP averages over data x context ranks: the exact token mean)."""
    mask = loss_mask.float().view(-1)
    total, count = (per_token.float().view(-1) * mask).sum(), mask.sum()
    cp = B.cp_size()
    if cp > 1:
        count = count.detach().clone()
        dist.all_reduce(count, group=B.cp_group())
    loss = total / count.clamp(min=1)
    # logged: averaged over data x context ranks, so scaled like the gradient (clone: the schedule scales the
    # returned loss in place)
    return loss, {"loss": (loss.detach() * cp).clone()}


def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"],
                packed_seq_params=b["packed_seq_params"])
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
    torch.save(B.rng_state(), path / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (out_dir / "checkpoints" / "latest").write_text(name + "\n")
        log.info("saved checkpoint %s", path)


def resume(path: Path, opt: B.Optim, rank: int) -> RunState:
    common = B.load_checkpoint(path, opt)
    B.set_rng_state(torch.load(path / f"rng_rank{rank:05d}.pt", weights_only=False))
    if rank == 0:
        log.info("resumed from %s (step %d)", path, common["state"]["step"])
    return RunState(**common["state"])


def load_initial(model: torch.nn.Module, cfg: TrainRunConfig, conf: Any, padded_vocab: int, te: bool) -> None:
    """This rank's tensor-parallel part of the starting weights, read slice by slice from the HF files."""
    local = hf_to_mcore_shard(initial_weights(cfg.model, conf), shape_of(conf), padded_vocab,
                              cfg.parallel.tensor, B.tp_rank())
    B.load_local_state_dict(model, to_te_names(local) if te else local)


def write_template(out_dir: Path, conf: Any, tokenizer: Any) -> None:
    """The HF config and tokenizer an export pairs with the checkpoint's weights."""
    path = out_dir / "checkpoints" / TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    conf.save_pretrained(path)
    tokenizer.save_pretrained(path)


# -------------------------------------------------------------------------------------------------- run
def build_model(conf: Any, cfg: TrainRunConfig) -> tuple[torch.nn.Module, Any, int, bool]:
    """The megatron GPTModel of HF config ``conf`` (this rank's shard): (model, TransformerConfig, padded
    vocab, uses TransformerEngine)."""
    padded = B.padded_vocab_size(conf.vocab_size, cfg.parallel.tensor)
    spec = B.ModelSpec(shape=shape_of(conf), hidden_size=conf.hidden_size, ffn_hidden_size=conf.intermediate_size,
                       rope_theta=rope_theta(conf), rms_norm_eps=conf.rms_norm_eps, padded_vocab=padded,
                       max_seq_length=cfg.train.seq_length)
    te = B.uses_te(cfg.train.transformer_impl)
    tconf = B.transformer_config(spec, cfg.train, cfg.parallel)
    return B.build_model(spec, tconf, te), tconf, padded, te


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
    manifest = ensure_prepared(cfg, rank)  # before the model: a GPU run without prepared data stops here
    dataset = build_mix(manifest, data_dir(cfg) / "index_cache")
    tokenizer = load_tokenizer(cfg.model)
    conf = llama_config(cfg.model, tokenizer, t.seq_length)
    model, tconf, padded, te = build_model(conf, cfg)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        load_initial(model, cfg, conf, padded, te)
    opt = B.build_optimizer(model, tconf, cfg.schedule, steps=t.steps, parallel=cfg.parallel)
    state = resume(ckpt, opt, rank) if ckpt is not None else RunState()
    if rank == 0:
        write_template(out_dir, conf, tokenizer)
        _drop_metrics_after(out_dir / "metrics.jsonl", state.step)
    metrics = MetricsLogger(out_dir, cfg.wandb, job_type="train", rank=rank,
                            config={"global_batch_size": t.global_batch_size, "steps": t.steps,
                                    "data_parallel": cfg.parallel.data, "transformer_engine": te})
    if rank == 0:
        log.info("training %s: %d steps x %d sequences x %d tokens (DP %d, TP %d, PP %d, CP %d; %s), from step %d",
                 cfg.model.name, t.steps, t.global_batch_size, t.seq_length, cfg.parallel.data,
                 cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context,
                 "TransformerEngine" if te else "local spec", state.step)
    try:
        _loop(cfg, opt, dataset, state, metrics, rank, flops_per_token(conf, t.seq_length), world, te)
    finally:
        metrics.close()
    if state.step >= t.steps and t.export_hf and rank == 0:
        # One rank reads the checkpoint just written, on CPU, like longattn-export (no collective, no NCCL).
        export_checkpoint(out_dir, out_dir / "hf", step=state.step)
    return {"step": state.step, "tokens": state.tokens}


def _loop(cfg: TrainRunConfig, opt: B.Optim, dataset: Any, state: RunState, metrics: MetricsLogger,
          rank: int, flops_per_token_: float, world: int, te: bool) -> None:
    t, out_dir = cfg.train, Path(cfg.out_dir)
    device = torch.device("cpu") if B.ON_CPU else torch.device("cuda", torch.cuda.current_device())
    step_tokens = t.global_batch_size * t.seq_length
    stop = t.steps if t.max_steps_this_run is None else min(t.steps, state.step + t.max_steps_this_run)
    opt.ddp.train()
    while state.step < stop:
        t0 = time.perf_counter()
        lr = B.current_lr(opt)
        losses, grad_norm, ok = B.train_step(opt, forward_step, StepBatches(dataset, cfg, state.step, device, te),
                                             num_microbatches=t.grad_accum, seq_length=t.seq_length,
                                             micro_batch_size=t.micro_batch_size)
        loss = _mean_loss(losses)
        dt = time.perf_counter() - t0
        state.step, state.tokens = state.step + 1, state.tokens + step_tokens
        tps = step_tokens / dt
        row = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm or 0.0), "tokens_per_s": tps,
               "tokens_per_s_per_device": tps / world,
               "mfu": flops_per_token_ * tps / world / (t.peak_tflops * 1e12), "tokens": state.tokens,
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
