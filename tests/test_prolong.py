"""ProLong baseline: the formula on hand-made numbers, and the batched / KV-reusing scorer against a literal
per-window implementation of the reference code's semantics on tiny causal LMs."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import sample_records

from longattn.common.models import ModelConfig
from longattn.selection.scorers import score_windows
from longattn.selection.scorers.prolong import (
    ProLongScorer,
    ProLongScorerConfig,
    dependency_specificity,
    prolong_lds,
    sample_pairs,
    split_chunks,
)

CHUNK = 32
W = 4 * CHUNK  # 4 chunks, 6 pairs per window


# --- pure functions ---------------------------------------------------------------------------------
def test_dependency_specificity():
    assert dependency_specificity(np.array([3.0])) == 1.0
    assert dependency_specificity(np.array([2.0, 2.0, 2.0])) == pytest.approx(0.0, abs=1e-12)
    p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    assert dependency_specificity(np.array([1.0, 0.0])) == pytest.approx(1 + np.sum(p * np.log(p)) / math.log(2))
    # softmax underflows to exact zeros: the reference adds 1e-12 before the entropy, giving ~1, not NaN
    assert dependency_specificity(np.array([0.0, -1e4, -1e4])) == pytest.approx(1.0, abs=1e-9)


def test_prolong_lds_by_hand():
    single = np.array([10.0, 10.0, 8.0])
    inf = np.inf
    pair = np.array([[inf, inf, inf], [5.0, inf, inf], [7.6, 4.0, inf]])
    out = prolong_lds(single, pair, threshold=0.1, chunk_num=5)
    # row 1: one pair, DE 1; drop 0.5 > 0.1, distance 1/4.  row 2: drops 0.4 and 4.0 (raw) -> 0.05, 0.5
    de2 = dependency_specificity(np.array([0.4, 4.0]))
    assert out["dependency_specificity"].tolist() == pytest.approx([0.0, 1.0, de2])
    assert out["lds"] == pytest.approx((0.5 + 0.25) * 1.0 + (0.5 + 0.25) * de2)
    assert out["n_pairs"] == 3 and out["n_dependent"] == 2
    # distance gain is clipped at 1 and scaled by the window's chunk_num, not the chunks present
    far = prolong_lds(np.array([10.0, 10.0]), np.array([[inf, inf], [1.0, inf]]), threshold=0.1, chunk_num=2)
    assert far["lds"] == pytest.approx(0.9 + 1.0)
    assert prolong_lds(np.array([np.nan, 1.0]), np.array([[inf, inf], [0.5, inf]]), threshold=0.1,
                       chunk_num=4)["lds"] == 0.5 + 1 / 3
    nan = prolong_lds(np.array([1.0, np.nan]), np.array([[inf, inf], [0.5, inf]]), threshold=-1, chunk_num=4)
    assert nan["lds"] == 0.0  # NaN -> 0, as the reference


def test_sample_pairs_and_chunks_follow_the_reference_rng():
    assert sample_pairs(4, -1, random.Random(11)) == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert sample_pairs(4, 7, random.Random(11)) == []  # fewer pairs than sample_size: not scored (LDS 0)
    random.seed(11)
    expected = random.sample([(i, j) for i in range(40) for j in range(i)], 500)
    assert sample_pairs(40, 500, random.Random(11)) == expected
    chunks = split_chunks(list(range(10)), 3, 10, random.Random(0))
    assert chunks == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # the partial last chunk is dropped
    rng = random.Random(5)
    got = split_chunks(list(range(30)), 3, 4, rng)
    keep = sorted(random.Random(5).sample(range(10), 4))
    assert got == [list(range(3 * k, 3 * k + 3)) for k in keep]


def test_config_validation_names_keys():
    with pytest.raises(ValueError, match="window.length=64"):
        ProLongScorerConfig(chunk_size=128).validate(64)
    with pytest.raises(ValueError, match="scorer.sample_size"):
        ProLongScorerConfig(sample_size=-5).validate(1024)


# --- the scorer against a literal implementation ----------------------------------------------------
def literal_prolong(model, tokenizer, text: str, *, length: int, chunk: int, sample_size: int,
                    threshold: float = 0.1, seed: int = 11) -> float:
    """The reference's steps, one window at a time: single forwards, [j + i] forwards with labels ignored on
    j, the shifted loss averaged over the last ``len - 1`` positions, then its double loop for LDS."""
    random.seed(seed)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    data = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    if len(data[-1]) < chunk:
        data = data[:-1]

    def ppl(inputs: list[list[int]], labels: list[list[int]], num: int) -> list[float]:
        logits = model(input_ids=torch.tensor(inputs)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), torch.tensor(labels)[:, 1:].flatten(),
                                                 reduction="none", ignore_index=-100).view(len(inputs), -1)
        return [math.exp(float(row[-num:].mean())) for row in loss]

    n = len(data)
    single = [ppl([c], [c], chunk - 1)[0] for c in data]
    pair = [[float("inf")] * n for _ in range(n)]
    pairs = [(i, j) for i in range(n) for j in range(i)]
    if sample_size > 0:
        pairs = [] if len(pairs) < sample_size else random.sample(pairs, sample_size)
    for i, j in pairs:
        pair[i][j] = ppl([data[j] + data[i]], [[-100] * (chunk + 1) + data[i][1:]], chunk - 1)[0]
    chunk_num = length // chunk
    dlt = [[0.0] * n for _ in range(n)]
    de = [0.0] * n
    for i in range(n):
        row = []
        for j in range(i):
            dlt[i][j] = single[i] - pair[i][j]
            if pair[i][j] != float("inf"):
                row.append(dlt[i][j])
        if row:
            de[i] = dependency_specificity(np.array(row))
    lds = 0.0
    for i in range(n):
        for j in range(i):
            dlt[i][j] /= single[i]
            if dlt[i][j] > threshold:
                lds += (dlt[i][j] + min(max((i - j) / (chunk_num - 1), 0), 1)) * de[i]
    return lds


def windows(n: int = 3) -> list[dict]:
    # different lengths: 4 full chunks, 3 chunks + a partial one, and a single chunk
    cuts = [3000, 330, 120][:n]
    return [{"data_id": f"w{k}", "category": r["category"], "content": r["content"][:c]}
            for k, (r, c) in enumerate(zip(sample_records(1), cuts, strict=False))]


@pytest.mark.parametrize("kv_reuse,sample_size", [(True, -1), (False, -1), (True, 4)])
def test_batched_scorer_equals_literal_reference(tiny_hf_dir, kv_reuse, sample_size):
    cfg = ProLongScorerConfig(chunk_size=CHUNK, sample_size=sample_size, kv_reuse=kv_reuse, forward_batch=4)
    scorer = ProLongScorer(cfg, ModelConfig(name="tiny", source="hf", path=str(tiny_hf_dir)), W)
    wins = windows()
    rows = score_windows(scorer, wins)
    with torch.inference_mode():
        ref = [literal_prolong(scorer.model, scorer.tokenizer, w["content"], length=W, chunk=CHUNK,
                               sample_size=sample_size) for w in wins]
    got = [r["prolong_lds"] for r in rows]
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert rows[0]["n_chunks"] == 4 and rows[2]["n_chunks"] < 2
    assert rows[0]["n_pairs"] == (6 if sample_size == -1 else 4)
    assert all(r["var"] == 0.0 and r["ds"] == r["prolong_lds"] for r in rows)
    if sample_size == -1:
        assert rows[0]["prolong_lds"] > 0  # a random tiny LM still yields dependent pairs on real text


def test_kv_reuse_is_exact_for_opt(tmp_path, tokenizer_dir):
    """OPT (learned absolute positions, the paper's scorer family): cached pairs equal literal [j, i]."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=512, word_embed_proj_dim=16, init_std=0.3)
    OPTForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    mcfg = ModelConfig(name="tiny_opt", source="hf", path=str(tmp_path))
    rows = {}
    for kv in (True, False):
        scorer = ProLongScorer(ProLongScorerConfig(chunk_size=CHUNK, sample_size=-1, kv_reuse=kv), mcfg, W)
        rows[kv] = score_windows(scorer, windows(2))
    for a, b in zip(rows[True], rows[False], strict=True):
        assert a["prolong_lds"] == pytest.approx(b["prolong_lds"], rel=1e-4, abs=1e-6)
        assert a["mean_pair_ppl"] == pytest.approx(b["mean_pair_ppl"], rel=1e-5)


def test_rope_theta_override_rebuilds_rotary(tiny_hf_dir):
    from transformers import AutoConfig, LlamaForCausalLM

    from longattn.common.models import load_causal_lm

    model = load_causal_lm(ModelConfig(name="t", source="hf", path=str(tiny_hf_dir), rope_theta=5e5, device="cpu"), 0)
    config = AutoConfig.from_pretrained(tiny_hf_dir)
    config.rope_parameters["rope_theta"] = 5e5
    ref = LlamaForCausalLM(config).eval()
    ref.load_state_dict(model.state_dict())
    ids = torch.arange(40)[None] % 100
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
        plain = load_causal_lm(ModelConfig(name="t", source="hf", path=str(tiny_hf_dir), device="cpu"), 0)
        assert not torch.allclose(plain(ids).logits, ref(ids).logits, atol=1e-3)
