"""Stage 2 pieces that need no megatron-core: weight layouts, the mix, config checks, launchers."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from longattn.common.errors import ConfigError
from train.config import PAPER_MIX, TrainRunConfig, derive, register_configs, validate_static
from train.convert import Shape, from_te_names, gather_tp, hf_to_mcore, mcore_to_hf, shard_tp, to_te_names
from train.data import blend_weights

S = Shape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=50)


def hf_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, d = 32, 48, S.head_dim

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    sd = {"model.embed_tokens.weight": r(S.vocab_size, h), "model.norm.weight": r(h), "lm_head.weight": r(S.vocab_size, h)}
    for i in range(S.num_layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h),
               p + "self_attn.q_proj.weight": r(S.num_heads * d, h), p + "self_attn.k_proj.weight": r(S.num_kv_heads * d, h),
               p + "self_attn.v_proj.weight": r(S.num_kv_heads * d, h), p + "self_attn.o_proj.weight": r(h, S.num_heads * d),
               p + "mlp.gate_proj.weight": r(f, h), p + "mlp.up_proj.weight": r(f, h), p + "mlp.down_proj.weight": r(h, f)}
    return sd


def test_hf_mcore_round_trip_is_exact():
    hf = hf_state()
    mc = hf_to_mcore(hf, S, padded_vocab=64)
    assert mc["embedding.word_embeddings.weight"].shape == (64, 32)
    assert torch.count_nonzero(mc["output_layer.weight"][50:]) == 0  # padding rows are zeros
    back = mcore_to_hf(mc, S)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_qkv_layout_is_one_block_per_query_group():
    hf = hf_state()
    qkv = hf_to_mcore(hf, S, 64)["decoder.layers.0.self_attention.linear_qkv.weight"]
    d, q, k = S.head_dim, hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"]
    # group 1 = [q heads 2, 3; k head 1; v head 1]
    block = qkv[4 * d : 8 * d]
    assert torch.equal(block[: 2 * d], q[2 * d : 4 * d]) and torch.equal(block[2 * d : 3 * d], k[d : 2 * d])


@pytest.mark.parametrize("tp", [1, 2])
def test_tensor_parallel_shards_gather_back(tp):
    full = hf_to_mcore(hf_state(), S, 64)
    shards = [shard_tp(full, tp, r) for r in range(tp)]
    gathered = gather_tp(shards)
    assert all(torch.equal(gathered[k], full[k]) for k in full)
    if tp == 2:  # fc1 of rank 0 is [gate_0; up_0]
        fc1 = full["decoder.layers.0.mlp.linear_fc1.weight"]
        gate, up = fc1.chunk(2)
        assert torch.equal(shards[0]["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[:24], up[:24]]))


def test_te_names_round_trip():
    full = hf_to_mcore(hf_state(), S, 64)
    te = to_te_names(full)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert from_te_names(te | {"decoder.layers.0.mlp.linear_fc1._extra_state": torch.zeros(1)}).keys() == full.keys()


def test_blend_weights_renormalise_over_present_sources():
    w = blend_weights(PAPER_MIX, ["arxiv", "book", "code"])
    assert w == pytest.approx({"arxiv": 1 / 3, "book": 1 / 3, "code": 1 / 3})
    w = blend_weights(PAPER_MIX, ["wiki", "arxiv"])
    assert w["wiki"] == pytest.approx(3 / 33)


def _compose(*overrides: str) -> TrainRunConfig:
    register_configs()
    GlobalHydra.instance().clear()  # another test may have left Hydra initialised
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainRunConfig), cfg))


def test_paper_experiment_derives_dp8_global_batch_64_and_steps_from_tokens():
    cfg = _compose("+experiment=train_paper_64gpu", "model.path=/models/llama3", "data.selected=/sel",
                   "train.tokens=5e9", "out_dir=/tmp/x")
    validate_static(cfg)
    derive(cfg, world_size=64)
    assert (cfg.parallel.tensor, cfg.parallel.data, cfg.train.global_batch_size) == (8, 8, 64)
    assert cfg.train.steps == -(-5_000_000_000 // (64 * 32768))  # 2385 steps of ~2.1M tokens
    assert cfg.model.rope_theta == 2.5e6 and cfg.schedule.lr == 1e-5 and cfg.train.dropout == 0.1
    assert cfg.launcher.name == "slurm" and cfg.launcher.nodes == 8


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("train_*.yaml")))
def test_every_train_experiment_composes(name):
    cfg = _compose(f"+experiment={name}", "out_dir=/tmp/x")
    assert cfg.train.seq_length > 0


@pytest.mark.parametrize("overrides, key", [
    ([], "train.tokens"),
    (["train.steps=3"], "data.selected"),
    (["train.steps=3", "data.selected=/s", "model.path=null"], "model.path"),
])
def test_validation_names_the_key(overrides, key):
    cfg = _compose("model=llama3_8b", "model.path=/m", "out_dir=/tmp/x", *overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_static(cfg)


@pytest.mark.parametrize("override,key", [("launcher.name=pbs", "launcher.name"), ("schedule.decay=step", "schedule.decay")])
def test_choice_fields_refuse_other_values_naming_the_key(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        _compose("model=llama3_8b", "model.path=/m", "out_dir=/tmp/x", override)
    assert f"full_key: {key}" in str(e.value.__cause__) and "expected one of" in str(e.value.__cause__)


def test_derive_rejects_a_world_size_tp_does_not_divide():
    cfg = _compose("model=tiny_llama", "parallel.tensor=2", "train.steps=1", "data.selected=/s", "out_dir=/x")
    with pytest.raises(ConfigError, match="parallel.tensor"):
        derive(cfg, world_size=3)


def test_sbatch_script_runs_one_torchrun_per_node(tmp_path):
    from train.launch import sbatch_script

    cfg = _compose("+experiment=train_paper_64gpu", "model.path=/m", "data.selected=/s", "train.tokens=5e9",
                   f"out_dir={tmp_path}")
    text = sbatch_script(cfg, ["+experiment=train_paper_64gpu", "launcher.name=slurm", "train.tokens=5e9"])
    assert "#SBATCH --nodes=8" in text and "#SBATCH --gpus-per-node=8" in text
    line = next(x for x in text.splitlines() if x.startswith("srun "))
    assert "--nnodes=$SLURM_NNODES" in line and "--nproc-per-node=8" in line and "--rdzv-backend=c10d" in line
    assert "launcher.name=local" in line and "launcher.name=slurm" not in line


def test_flops_per_token_of_llama3_8b_at_32k():
    from transformers import LlamaConfig

    from train.hf import flops_per_token

    conf = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    # 6 x 8.03e9 parameters + 12 x 32 x 4096 x 32768 (the figure docs/train.md's estimate starts from)
    assert flops_per_token(conf, 32768) == pytest.approx(9.97e10, rel=1e-3)
