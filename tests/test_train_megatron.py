"""megatron-core GPTModel on CPU (world size 1, gloo, through train.cpu_compat): HF parity and learning."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from longattn.common.models import ModelConfig  # noqa: E402
from train.config import TrainRunConfig  # noqa: E402
from train.hf import llama_config  # noqa: E402


def _cfg(hf_dir, **train) -> TrainRunConfig:
    cfg = TrainRunConfig(model=ModelConfig(name="tiny_hf", source="hf", path=str(hf_dir)), out_dir="unused")
    cfg.train.seq_length, cfg.train.bf16, cfg.train.dropout, cfg.train.seed = 64, False, 0.0, 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture()
def megatron_model(tiny_hf_dir):
    """(megatron model loaded from the tiny HF checkpoint, HF config, cfg) inside the process-group scope."""
    from transformers import AutoTokenizer

    from train.loop import build_model, distributed_scope, load_initial

    cfg = _cfg(tiny_hf_dir)
    conf = llama_config(cfg.model, AutoTokenizer.from_pretrained(tiny_hf_dir), cfg.train.seq_length)
    with distributed_scope(cfg):
        model, tconf, padded, te = build_model(conf, cfg)
        load_initial(model, cfg, conf, padded, te)
        yield model, tconf, conf, cfg


def _causal_inputs(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = ids.shape[1]
    return torch.arange(n).unsqueeze(0), torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1)


def test_logits_match_transformers(megatron_model, tiny_hf_dir):
    from transformers import LlamaForCausalLM

    model, _, conf, _ = megatron_model
    ids = torch.randint(0, conf.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ours = model(ids, *_causal_inputs(ids))[..., : conf.vocab_size]
        ref = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_export_round_trip_matches_logits(megatron_model, tmp_path, tiny_hf_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from train.convert import mcore_to_hf
    from train.hf import save_hf, shape_of

    model, _, conf, _ = megatron_model
    local = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    save_hf(tmp_path / "hf", conf, mcore_to_hf(local, shape_of(conf)), AutoTokenizer.from_pretrained(tiny_hf_dir))
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    ref = LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)  # exact: HF -> megatron -> HF changes no bit


def test_loss_goes_down_on_a_repeated_batch(megatron_model):
    from train import megatron_backend as B
    from train.loop import forward_step

    model, tconf, conf, cfg = megatron_model
    cfg.schedule.lr, cfg.schedule.warmup_fraction, cfg.schedule.decay = 3e-3, 0.0, "constant"
    opt = B.build_optimizer(model, tconf, cfg.schedule, steps=10, parallel=cfg.parallel)
    ids = torch.randint(0, conf.vocab_size, (1, 65), generator=torch.Generator().manual_seed(1))
    pos, mask = _causal_inputs(ids[:, :-1])
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(1, 64),
             "position_ids": pos, "attention_mask": mask, "packed_seq_params": None}
    curve = []
    for _ in range(8):
        losses, grad_norm, ok = B.train_step(opt, forward_step, iter([batch, batch]), num_microbatches=2,
                                             seq_length=64, micro_batch_size=1)
        assert ok and grad_norm > 0
        curve.append(float(losses[0]["loss"]))
    assert curve[-1] < curve[0] - 0.5, curve


def test_no_token_attends_across_packed_documents(megatron_model):
    """A sample packing two documents (positions restarting at the second, as megatron's GPTDataset gives
    them) yields, for the second document, the logits of that document alone: the per-document mask keeps
    attention inside it, and RoPE is relative, so its offset in the sample changes nothing."""
    from train import megatron_backend as B

    model, _, conf, _ = megatron_model
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, conf.vocab_size, (1, 20), generator=g), torch.randint(0, conf.vocab_size, (1, 28), generator=g)
    packed = {"tokens": torch.cat([a, b], 1), "position_ids": torch.cat([torch.arange(20), torch.arange(28)]).unsqueeze(0)}
    inputs = B.model_inputs(packed, te=False)
    model.eval()
    with torch.no_grad():
        together = model(inputs["tokens"], inputs["position_ids"], inputs["attention_mask"])
        alone = model(b, *_causal_inputs(b))
        crossing = model(inputs["tokens"], inputs["position_ids"], _causal_inputs(inputs["tokens"])[1])
    assert torch.allclose(together[:, 20:], alone, atol=1e-4), (together[:, 20:] - alone).abs().max()
    assert not torch.allclose(crossing[:, 20:], alone, atol=1e-2)  # a plain causal mask would mix them
