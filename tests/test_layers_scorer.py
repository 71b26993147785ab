"""LongAttn statistics from other layers / heads: layer 0 equals the paper's scorer; heads and layers select."""

from __future__ import annotations

import pytest
from conftest import sample_records

from longattn.common.models import ModelConfig
from longattn.selection.scorers import score_windows
from longattn.selection.scorers.layers import LayersScorer, LayersScorerConfig
from longattn.selection.scorers.longattn import LongAttnScorer, LongAttnScorerConfig

L = 96


@pytest.fixture(scope="module")
def wins():
    return [{"data_id": str(i), "category": "c", "content": r["content"][: 150 + 3000 * i]}
            for i, r in enumerate(sample_records(1)[:2])]  # a padded window and a full one


def test_layer0_equals_longattn_scorer_and_heads_select(tiny_hf_dir, wins):
    mcfg = ModelConfig(name="tiny", source="hf", path=str(tiny_hf_dir))
    ref = score_windows(LongAttnScorer(LongAttnScorerConfig(batch_size=2), mcfg, L), wins)
    got = score_windows(LayersScorer(LayersScorerConfig(layers=[0]), mcfg, L), wins)
    for a, b in zip(got, ref, strict=True):
        assert a["ds_heads"] == pytest.approx(b["ds_heads"], rel=1e-5)
        assert a["var_heads"] == pytest.approx(b["var_heads"], rel=1e-5)
    two = score_windows(LayersScorer(LayersScorerConfig(layers=[0], heads=[1, 3]), mcfg, L), wins)
    assert two[1]["ds_heads"] == pytest.approx([ref[1]["ds_heads"][1], ref[1]["ds_heads"][3]], rel=1e-5)
    both = score_windows(LayersScorer(LayersScorerConfig(layers=[0, 1]), mcfg, L), wins)
    assert len(both[1]["ds_heads"]) == 8 and both[1]["ds_heads"][:4] == pytest.approx(ref[1]["ds_heads"], rel=1e-5)
    assert both[1]["ds_heads"][4:] != pytest.approx(ref[1]["ds_heads"], rel=1e-3)  # layer 1 differs


def test_bad_layers_name_the_key(tiny_hf_dir):
    with pytest.raises(ValueError, match="scorer.layers"):
        LayersScorerConfig(layers=[]).validate(L)
    with pytest.raises(ValueError, match="scorer.layers=\\[5\\]"):
        LayersScorer(LayersScorerConfig(layers=[5]), ModelConfig(name="t", source="hf", path=str(tiny_hf_dir)), L)
