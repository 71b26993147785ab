"""HF LLaMA <-> megatron-core GPTModel weights: pure tensor functions (no megatron import).

Layouts (megatron-core local layer spec names; the TransformerEngine spec fuses the norms into the
next linear layer, see ``TE_NORM_NAMES``):
- ``linear_qkv`` holds one block per query group: ``[q heads of the group; k; v]`` rows.
- ``linear_fc1`` is ``[gate; up]``; with tensor parallelism each rank holds ``[gate_r; up_r]``.
- RoPE needs no permutation: megatron's non-interleaved rotary equals HF's rotate-half.
- The vocabulary is padded for tensor parallelism (extra rows are zeros) and cut back on export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

# local spec name -> TransformerEngine spec name (TE fuses RMSNorm into the following linear layer).
TE_NORM_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                 "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


@dataclass(frozen=True)
class Shape:
    """What the conversion needs to know about the architecture."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    """The tokenizer's vocabulary (HF side, unpadded)."""


def _qkv_fuse(q: Tensor, k: Tensor, v: Tensor, s: Shape) -> Tensor:
    per, d = s.num_heads // s.num_kv_heads, s.head_dim
    hidden = q.shape[-1]
    q = q.view(s.num_kv_heads, per * d, hidden)
    k = k.view(s.num_kv_heads, d, hidden)
    v = v.view(s.num_kv_heads, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def _qkv_split(qkv: Tensor, s: Shape) -> tuple[Tensor, Tensor, Tensor]:
    per, d = s.num_heads // s.num_kv_heads, s.head_dim
    hidden = qkv.shape[-1]
    q, k, v = qkv.view(s.num_kv_heads, (per + 2) * d, hidden).split([per * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def pad_rows(w: Tensor, rows: int) -> Tensor:
    """Zero rows appended up to ``rows`` (the padded vocabulary)."""
    if w.shape[0] >= rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])])


def hf_to_mcore(hf: dict[str, Tensor], s: Shape, padded_vocab: int) -> dict[str, Tensor]:
    """A ``LlamaForCausalLM`` state dict -> a full (unsharded) megatron GPTModel state dict."""
    out = {"embedding.word_embeddings.weight": pad_rows(hf["model.embed_tokens.weight"], padded_vocab),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    # Tied HF checkpoints have no lm_head: megatron here always has an untied output layer (LLaMA-3).
    out["output_layer.weight"] = pad_rows(hf.get("lm_head.weight", hf["model.embed_tokens.weight"]), padded_vocab)
    for i in range(s.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _qkv_fuse(
            hf[h + "self_attn.q_proj.weight"], hf[h + "self_attn.k_proj.weight"], hf[h + "self_attn.v_proj.weight"], s)
        out[m + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    return out


def mcore_to_hf(mc: dict[str, Tensor], s: Shape) -> dict[str, Tensor]:
    """A full megatron GPTModel state dict -> ``LlamaForCausalLM`` state dict (vocabulary un-padded)."""
    out = {"model.embed_tokens.weight": mc["embedding.word_embeddings.weight"][: s.vocab_size],
           "model.norm.weight": mc["decoder.final_layernorm.weight"],
           "lm_head.weight": mc["output_layer.weight"][: s.vocab_size]}
    for i in range(s.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = _qkv_split(mc[m + "self_attention.linear_qkv.weight"], s)
        gate, up = mc[m + "mlp.linear_fc1.weight"].chunk(2)
        out |= {h + "input_layernorm.weight": mc[m + "input_layernorm.weight"],
                h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                h + "self_attn.v_proj.weight": v,
                h + "self_attn.o_proj.weight": mc[m + "self_attention.linear_proj.weight"],
                h + "post_attention_layernorm.weight": mc[m + "pre_mlp_layernorm.weight"],
                h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                h + "mlp.down_proj.weight": mc[m + "mlp.linear_fc2.weight"]}
    return {k: v.contiguous() for k, v in out.items()}


def _tp_rule(name: str) -> str:
    """How a parameter is split over tensor-parallel ranks: rows, cols, gated (fc1) or replicated."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight")):
        return "rows"
    if name.endswith("linear_fc1.weight"):
        return "gated"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "cols"
    return "replicated"


def shard_tp(full: dict[str, Tensor], tp: int, rank: int) -> dict[str, Tensor]:
    """The slice of a full megatron state dict that tensor-parallel rank ``rank`` of ``tp`` holds.

    ``rows`` splits dim 0 in contiguous chunks: for ``linear_qkv`` that gives each rank whole query groups.
    """
    out = {}
    for name, w in full.items():
        rule = _tp_rule(name)
        if rule == "rows":
            w = w.chunk(tp, dim=0)[rank]
        elif rule == "cols":
            w = w.chunk(tp, dim=1)[rank]
        elif rule == "gated":
            gate, up = w.chunk(2)
            w = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
        out[name] = w.contiguous()
    return out


def gather_tp(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of ``shard_tp``: per-rank state dicts (in rank order) -> the full state dict."""
    out = {}
    for name in shards[0]:
        parts = [sd[name] for sd in shards]
        rule = _tp_rule(name)
        if rule == "rows":
            out[name] = torch.cat(parts, dim=0)
        elif rule == "cols":
            out[name] = torch.cat(parts, dim=1)
        elif rule == "gated":
            halves = [p.chunk(2) for p in parts]
            out[name] = torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])])
        else:
            out[name] = parts[0]
    return out


def to_te_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Local-spec names -> TransformerEngine-spec names (fused norms)."""
    out = {}
    for name, w in sd.items():
        for local, te in TE_NORM_NAMES.items():
            if name.endswith(local):
                name = name[: -len(local)] + te
        out[name] = w
    return out


def from_te_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """TransformerEngine-spec names -> local-spec names; TE's ``_extra_state`` entries are dropped."""
    out = {}
    for name, w in sd.items():
        if name.endswith("_extra_state"):
            continue
        for local, te in TE_NORM_NAMES.items():
            if name.endswith(te):
                name = name[: -len(te)] + local
        out[name] = w
    return out



class DictReader:
    """Slices of an in-memory HF state dict (what ``hf_to_mcore_shard`` reads; see ``train.hf`` for files)."""

    def __init__(self, sd: dict[str, Tensor]):
        self.sd = sd

    def __contains__(self, name: str) -> bool:
        return name in self.sd

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[name].shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        w = self.sd[name]
        return w if dim is None else w.narrow(dim, start, (w.shape[dim] if stop is None else stop) - start)


def hf_to_mcore_shard(src: DictReader, s: Shape, padded_vocab: int, tp: int, rank: int) -> dict[str, Tensor]:
    """This tensor-parallel rank's part of the megatron state dict, reading only that part of each HF tensor
    (equal to ``shard_tp(hf_to_mcore(hf), tp, rank)``): whole query groups of QKV, rows of fc1's gate and
    up, columns of the row-parallel projections, rows of the (padded) vocabulary. ``src`` is any reader
    with ``shape``/``read``/``in`` (a dict, or safetensors files read slice by slice)."""

    def part(name: str, dim: int) -> Tensor:
        n = src.shape(name)[dim] // tp
        return src.read(name, dim, rank * n, (rank + 1) * n)

    rows = padded_vocab // tp
    lo, hi = min(rank * rows, s.vocab_size), min((rank + 1) * rows, s.vocab_size)
    head = "lm_head.weight" if "lm_head.weight" in src else "model.embed_tokens.weight"  # tied: untie
    out = {"embedding.word_embeddings.weight": pad_rows(src.read("model.embed_tokens.weight", 0, lo, hi), rows),
           "decoder.final_layernorm.weight": src.read("model.norm.weight"),
           "output_layer.weight": pad_rows(src.read(head, 0, lo, hi), rows)}
    local = Shape(s.num_layers, s.num_heads // tp, s.num_kv_heads // tp, s.head_dim, s.vocab_size)
    for i in range(s.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = [part(h + f"self_attn.{x}_proj.weight", 0) for x in "qkv"]  # whole query groups per rank
        out |= {m + "input_layernorm.weight": src.read(h + "input_layernorm.weight"),
                m + "self_attention.linear_qkv.weight": _qkv_fuse(*qkv, local),
                m + "self_attention.linear_proj.weight": part(h + "self_attn.o_proj.weight", 1),
                m + "pre_mlp_layernorm.weight": src.read(h + "post_attention_layernorm.weight"),
                m + "mlp.linear_fc1.weight": torch.cat([part(h + "mlp.gate_proj.weight", 0),
                                                        part(h + "mlp.up_proj.weight", 0)]),
                m + "mlp.linear_fc2.weight": part(h + "mlp.down_proj.weight", 1)}
    return {k: v.contiguous() for k, v in out.items()}
