"""Stage 2 pieces that need no megatron model: weight layouts, batches, the mix, config checks, launchers."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from longattn.common.errors import ConfigError
from train import batches
from train.config import (
    TrainRunConfig,
    derive,
    register_configs,
    validate_environment,
    validate_inputs,
    validate_static,
)
from train.convert import (
    DictReader,
    Shape,
    from_te_names,
    gather_tp,
    hf_to_mcore,
    hf_to_mcore_shard,
    mcore_to_hf,
    shard_tp,
    to_te_names,
)

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


# ------------------------------------------------------------------------------------------ weight layouts
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


@pytest.mark.parametrize("tp", [1, 2])
def test_each_rank_reads_only_its_slices_of_the_hf_files(tp, tmp_path):
    from safetensors.torch import save_file

    from train.hf import SafetensorsReader

    hf = hf_state()
    names = sorted(hf)
    save_file({k: hf[k] for k in names[:10]}, str(tmp_path / "a.safetensors"))  # a sharded checkpoint
    save_file({k: hf[k] for k in names[10:]}, str(tmp_path / "b.safetensors"))
    full = hf_to_mcore(hf, S, 256)  # padded vocabulary beyond the real one on rank 1
    for rank in range(tp):
        want = shard_tp(full, tp, rank)
        for reader in (DictReader(hf), SafetensorsReader(tmp_path)):
            got = hf_to_mcore_shard(reader, S, 256, tp, rank)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_te_names_round_trip():
    full = hf_to_mcore(hf_state(), S, 64)
    te = to_te_names(full)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert from_te_names(te | {"decoder.layers.0.mlp.linear_fc1._extra_state": torch.zeros(1)}).keys() == full.keys()


def test_flops_per_token_counts_causal_attention():
    from transformers import LlamaConfig

    from train.hf import flops_per_token

    conf = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    n = 32 * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336) + 128256 * 4096  # matmul weights: 7.50e9
    # 6 N + 6 L s d_attn: a causal token attends to s/2 keys on average (docs/train.md states the formula)
    assert flops_per_token(conf, 32768) == 6 * n + 6 * 32 * 32768 * 4096
    assert flops_per_token(conf, 32768) == pytest.approx(7.08e10, rel=1e-3)


# ------------------------------------------------------------------------------------------------ batches
def test_a_window_with_bos_is_one_sample_whose_targets_are_the_window():
    window = torch.arange(100, 108).numpy()
    s = batches.window_sample(torch.cat([torch.tensor([1]), torch.arange(100, 108)]).numpy(), 8)
    assert s["tokens"].tolist() == [1, *window[:-1]] and s["labels"].tolist() == window.tolist()
    assert s["loss_mask"].tolist() == [1.0] * 8 and s["position_ids"].tolist() == list(range(8))
    no_bos = batches.window_sample(window, 8)  # without BOS the last position has no target
    assert no_bos["tokens"].tolist() == window.tolist() and no_bos["loss_mask"].tolist() == [1.0] * 7 + [0.0]
    short = batches.window_sample(window[:5], 8)  # a window that re-tokenised shorter: padded, never merged
    assert short["loss_mask"].tolist() == [1.0] * 4 + [0.0] * 4 and short["tokens"][5:].tolist() == [0, 0, 0]


def test_packed_documents_get_causal_block_diagonal_masks_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    mask = batches.causal_document_mask(pos)[:, 0]
    allowed = ~mask
    assert allowed[0, 4].tolist() == [False, False, False, True, True, False]  # doc 2 sees itself only
    assert allowed[1].equal(torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    assert batches.is_packed(pos) and not batches.is_packed(pos[1:])
    cu, longest = batches.cu_seqlens(pos)
    assert cu.tolist() == [0, 3, 5, 6, 12] and longest == 6 and cu.dtype == torch.int32


def test_documents_relaid_for_context_parallelism_start_at_multiples():
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7]])
    tokens = torch.arange(16).reshape(1, 16) + 100
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(1, 16), "position_ids": pos}
    out, cu, cu_padded = batches.pad_documents_for_cp(batch, multiple=4)
    assert cu_padded.tolist() == [0, 4, 12, 16] and cu.tolist() == [0, 3, 8, 12]
    assert out["tokens"][0, :3].tolist() == [100, 101, 102] and out["tokens"][0, 4:9].tolist() == [103, 104, 105, 106, 107]
    assert out["loss_mask"][0].tolist() == [1, 1, 1, 0] + [1] * 5 + [0] * 3 + [1] * 4
    assert out["tokens"][0, 12:].tolist() == [108, 109, 110, 111]  # the last document's tail is cut to fit


# -------------------------------------------------------------------------------------------------- mix
def test_mix_gives_each_source_its_share_of_samples():
    pytest.importorskip("megatron.core")
    from train.samples import samples_per_source

    counts = samples_per_source([3, 3, 4, 30, 30, 30], 1000)
    assert sum(counts) == 1000 and counts == [30, 30, 40, 300, 300, 300]


def test_mix_plan_renormalises_drops_unweighted_and_budgets_short_sources(tmp_path):
    pytest.importorskip("megatron.core")
    from train.prepare import mix_plan

    short = tmp_path / "wiki.jsonl"
    cfg = _compose("model=tiny_llama", f"data.short.wiki={short}", "train.steps=10", "train.seq_length=128",
                   "out_dir=/x", "data.prepare.short_margin=0.5")
    derive(cfg, world_size=1)  # global batch 8 -> 80 samples
    plan = mix_plan(cfg, {"arxiv": 5, "book": 5, "poetry": 2})
    assert list(plan.weights) == ["wiki", "arxiv", "book"] and plan.dropped == {"poetry": "no blend weight (data.weights)"}
    assert plan.weights["wiki"] == pytest.approx(3 / 63) and sum(plan.samples.values()) == 80
    assert plan.budgets == {"wiki": -(-(plan.samples["wiki"] * 128 + 1) * 3 // 2)}


def test_scan_counts_windows_per_category_and_unit_offsets(tmp_path):
    from train.prepare import scan_windows

    path = tmp_path / "selected.jsonl"
    rows = [{"content": 'a "category": "x"', "data_id": f"w{i}", "category": c} for i, c in enumerate("aabab")]
    lines = [json.dumps(r) + "\n" for r in rows]
    path.write_text("".join(lines))
    scan = scan_windows(str(path), unit_records=2)
    assert scan["categories"] == {"a": 3, "b": 2} and scan["windows"] == 5
    assert scan["offsets"] == [0, len(lines[0]) + len(lines[1]), sum(map(len, lines[:4]))]


# ------------------------------------------------------------------------------------------------ config
def _compose(*overrides: str) -> TrainRunConfig:
    register_configs()
    GlobalHydra.instance().clear()  # another test may have left Hydra initialised
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainRunConfig), cfg))


def _selection(tmp_path, window_length: int = 32768, rows: int = 1):
    sel = tmp_path / "sel"
    sel.mkdir(exist_ok=True)
    (sel / "config.yaml").write_text(f"window:\n  length: {window_length}\n")
    (sel / "selected.jsonl").write_text("".join(json.dumps({"content": "x", "data_id": f"a{i}", "category": "arxiv"})
                                                + "\n" for i in range(rows)))
    return sel


def _model_dir(tmp_path):
    model = tmp_path / "llama3"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return model


@pytest.mark.parametrize("name, world, gb", [("train_paper_64gpu", 64, 64), ("train_tiny_cpu", 1, 4)])
def test_train_experiments_validate_and_derive_their_batch(name, world, gb, tmp_path):
    cfg = _compose(f"+experiment={name}", "out_dir=/tmp/x")
    sel = _selection(tmp_path, cfg.train.seq_length)
    cfg = _compose(f"+experiment={name}", f"model.path={_model_dir(tmp_path)}", f"data.selected={sel}",
                   "train.tokens=5e9", "out_dir=/tmp/x")
    validate_static(cfg)
    validate_inputs(cfg)  # a selection of windows of seq_length tokens, a model directory
    derive(cfg, world_size=world)
    assert cfg.train.global_batch_size == gb
    assert cfg.train.steps == -(-5_000_000_000 // (gb * cfg.train.seq_length))
    if name == "train_paper_64gpu":  # Appendix B
        assert (cfg.parallel.tensor, cfg.parallel.data) == (8, 8) and cfg.train.steps == 2385
        assert cfg.model.rope_theta == 2.5e6 and cfg.schedule.lr == 1e-5 and cfg.train.dropout == 0.1
        assert cfg.launcher.name == "slurm" and cfg.launcher.nodes == 8 and cfg.launcher.exclusive


@pytest.mark.parametrize("overrides, key", [
    ([], "train.tokens"),
    (["train.steps=3"], "data.selected"),
    (["train.steps=3", "data.selected=/s", "model.path=null"], "model.path"),
    (["train.steps=3", "data.selected=/s", "data.prepare.rank=2"], "data.prepare.rank"),
    (["train.steps=3", "data.selected=/s", "parallel.context=2", "train.transformer_impl=local"], "parallel.context"),
])
def test_static_validation_names_the_key(overrides, key):
    cfg = _compose("model=llama3_8b", "model.path=/m", "out_dir=/tmp/x", *overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_static(cfg)


@pytest.mark.parametrize("case, key", [("missing", "data.selected"), ("empty", "data.selected"),
                                       ("length", "train.seq_length"), ("short", "data.short.wiki"),
                                       ("model", "model.path")])
def test_input_validation_names_the_key(case, key, tmp_path):
    sel = _selection(tmp_path, 256 if case == "length" else 32768, rows=0 if case == "empty" else 1)
    model = _model_dir(tmp_path) if case != "model" else tmp_path
    overrides = [f"data.selected={tmp_path / 'nothing' if case == 'missing' else sel}", f"model.path={model}",
                 "train.steps=1", "out_dir=/x"]
    if case == "short":
        overrides.append(f"data.short.wiki={tmp_path / 'wiki.jsonl'}")
    cfg = _compose(*overrides)
    validate_static(cfg)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_inputs(cfg)


def test_wandb_without_a_key_and_not_offline_is_refused_before_anything_runs(tmp_path):
    cfg = _compose("model=tiny_llama", "data.selected=/s", "train.steps=1", "out_dir=/x", "wandb.enabled=true")
    home = {"HOME": str(tmp_path)}
    with pytest.raises(ConfigError, match="wandb.enabled"):
        validate_environment(cfg, env=home, gpus=0)
    validate_environment(cfg, env=home | {"WANDB_MODE": "offline"}, gpus=0)
    validate_environment(cfg, env=home | {"WANDB_API_KEY": "k"}, gpus=0)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    validate_environment(cfg, env=home, gpus=0)  # `wandb login` keeps the key in ~/.netrc


def test_cuda_without_transformer_engine_names_the_gpu_extra(caplog):
    cfg = _compose("model=tiny_llama", "data.selected=/s", "train.steps=1", "out_dir=/x", "train.seq_length=32768")
    with pytest.raises(ConfigError, match=r"longattn\[gpu\].*train\.transformer_impl=local"):
        validate_environment(cfg, env={}, gpus=8, have_te=False)
    validate_environment(cfg, env={}, gpus=8, have_te=True)
    validate_environment(cfg, env={}, gpus=0, have_te=False)  # the CPU path uses the local spec
    cfg.train.transformer_impl = "local"
    with caplog.at_level(logging.WARNING):
        validate_environment(cfg, env={}, gpus=8, have_te=False)
    # 4 heads x 32768^2 fp32 scores and probabilities: 32 GiB per layer and micro-batch
    assert "32.0 GiB per layer" in caplog.text


def test_launcher_is_checked_before_anything_runs(tmp_path, monkeypatch):
    cfg = _compose("model=tiny_llama", "data.selected=/s", "train.steps=1", "out_dir=/x", "launcher=slurm",
                   "launcher.submit=true")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ConfigError, match="launcher.submit"):
        validate_environment(cfg, env={}, gpus=0)
    cfg = _compose("model=tiny_llama", "data.selected=/s", "train.steps=1", "out_dir=/x", "launcher.nproc_per_node=8")
    with pytest.raises(ConfigError, match="launcher.nproc_per_node=8"):
        validate_environment(cfg, env={}, gpus=4, have_te=True)


@pytest.mark.parametrize("override,key", [("launcher.name=pbs", "launcher.name"), ("schedule.decay=step", "schedule.decay"),
                                          ("data.bos=maybe", "data.bos"), ("train.recompute=some", "train.recompute"),
                                          ("train.transformer_impl=apex", "train.transformer_impl")])
def test_choice_fields_refuse_other_values_naming_the_key(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        _compose("model=llama3_8b", "model.path=/m", "out_dir=/tmp/x", override)
    assert f"full_key: {key}" in str(e.value.__cause__) and "expected one of" in str(e.value.__cause__)


def test_derive_rejects_a_world_size_tp_does_not_divide():
    cfg = _compose("model=tiny_llama", "parallel.tensor=2", "train.steps=1", "data.selected=/s", "out_dir=/x")
    with pytest.raises(ConfigError, match="parallel.tensor"):
        derive(cfg, world_size=3)


# ---------------------------------------------------------------------------------------------- launchers
def test_sbatch_script_takes_whole_nodes_and_runs_one_torchrun_per_node(tmp_path):
    from train.launch import sbatch_script

    cfg = _compose("+experiment=train_paper_64gpu", "model.path=/m", "data.selected=/s", "train.tokens=5e9",
                   f"out_dir={tmp_path}")
    text = sbatch_script(cfg, ["+experiment=train_paper_64gpu", "launcher.name=slurm", "train.tokens=5e9"])
    for line in ("#SBATCH --nodes=8", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --mem=0",
                 "#SBATCH --exclusive"):
        assert line in text.splitlines()
    line = next(x for x in text.splitlines() if x.startswith("srun "))
    assert "--nnodes=$SLURM_NNODES" in line and "--nproc-per-node=8" in line and "--rdzv-backend=c10d" in line
    assert "launcher.name=local" in line and "launcher.name=slurm" not in line


def test_prepare_script_is_a_cpu_array_of_prepare_ranks(tmp_path):
    from train.launch import prepare_script

    cfg = _compose("+experiment=train_paper_64gpu", "model.path=/m", "data.selected=/s", "train.tokens=5e9",
                   f"out_dir={tmp_path}", "data.prepare.world_size=16")
    text = prepare_script(cfg, ["+experiment=train_paper_64gpu", "train.tokens=5e9", "data.prepare.world_size=16"])
    lines = text.splitlines()
    assert "#SBATCH --array=0-15" in lines and not any("gpus" in x or "exclusive" in x for x in lines)
    cmd = lines[-1]
    assert "train.prepare_only=true" in cmd and "data.prepare.rank=$SLURM_ARRAY_TASK_ID" in cmd
    assert "data.workers=$SLURM_CPUS_PER_TASK" in cmd and cmd.count("data.prepare.world_size=16") == 1


def test_megatron_core_has_every_name_and_keyword_train_passes():
    """The floor in pyproject (megatron-core>=0.16) is where these first all exist; GPU-only ones included."""
    pytest.importorskip("megatron.core")
    import dataclasses
    import inspect

    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.utils import get_batch_on_this_cp_rank, get_thd_batch_on_this_cp_rank

    def missing_fields(cls, names: str) -> set[str]:
        return set(names.split()) - {f.name for f in dataclasses.fields(cls)}

    def missing_params(fn, names: str) -> set[str]:
        return set(names.split()) - set(inspect.signature(fn).parameters)

    assert not missing_fields(TransformerConfig, """num_layers hidden_size num_attention_heads num_query_groups
        kv_channels ffn_hidden_size normalization layernorm_epsilon gated_linear_unit activation_func add_bias_linear
        add_qkv_bias hidden_dropout attention_dropout tensor_model_parallel_size pipeline_model_parallel_size
        context_parallel_size sequence_parallel bf16 params_dtype pipeline_dtype use_cpu_initialization
        perform_initialization init_method_std recompute_granularity recompute_method recompute_num_layers
        bias_activation_fusion bias_dropout_fusion apply_rope_fusion masked_softmax_fusion gradient_accumulation_fusion
        persist_layer_norm cross_entropy_loss_fusion cross_entropy_fusion_impl finalize_model_grads_func no_sync_func""")
    assert not missing_fields(DistributedDataParallelConfig, """grad_reduce_in_fp32 overlap_grad_reduce
        overlap_param_gather use_distributed_optimizer check_for_nan_in_grad""")
    assert not missing_fields(OptimizerConfig, """optimizer lr min_lr weight_decay adam_beta1 adam_beta2 adam_eps
        clip_grad bf16 params_dtype use_distributed_optimizer overlap_param_gather""")
    assert not missing_fields(GPTDatasetConfig, """random_seed sequence_length blend split path_to_cache tokenizer
        reset_position_ids reset_attention_mask eod_mask_loss create_attention_mask""")
    assert not missing_fields(PackedSeqParams, "qkv_format cu_seqlens_q cu_seqlens_kv max_seqlen_q max_seqlen_kv")
    assert not missing_params(OptimizerParamScheduler.__init__, """optimizer init_lr max_lr min_lr lr_warmup_steps
        lr_decay_steps lr_decay_style start_wd end_wd wd_incr_steps wd_incr_style""")
    assert not missing_params(GPTModel.__init__, """vocab_size max_sequence_length position_embedding_type
        rotary_base share_embeddings_and_output_weights pre_process post_process""")
    assert not missing_params(GPTModel.forward, "input_ids position_ids attention_mask labels packed_seq_params")
    assert not missing_params(tensor_parallel.model_parallel_cuda_manual_seed, "seed inference_rng_tracker")
    assert not missing_params(parallel_state.get_data_parallel_group, "with_context_parallel")
    assert not missing_params(get_thd_batch_on_this_cp_rank, "batch cu_seqlens cu_seqlens_padded max_seqlen")
    assert callable(get_batch_on_this_cp_rank) and callable(helpers.build_blending_indices)
    for owner, names in [(IndexedDatasetBuilder, "add_index add_document finalize"),
                         (GPTDataset, "_query_document_sample_shuffle_indices"),
                         (DistributedDataParallel, "no_sync disable_forward_pre_hook enable_forward_pre_hook"),
                         (tensor_parallel.random.CudaRNGStatesTracker, "get_states set_states"),
                         (dist_checkpointing, "save load")]:
        assert all(hasattr(owner, n) for n in names.split()), owner
