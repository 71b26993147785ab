"""The training samples: one dataset per source over megatron indexed datasets, blended by the Table 7 weights.

The one module besides ``train.megatron_backend`` that imports megatron-core, and only its ``datasets``:

- ``WindowDataset``: the selected windows of one category, **one window per sample** (a seeded permutation of
  the windows, repeated in fresh orders if the mix asks for more samples than there are windows).
- short sources: megatron's ``GPTDataset``, documents packed into ``seq_length`` samples with
  ``reset_position_ids``, ``reset_attention_mask`` and ``eod_mask_loss`` on: positions restart and
  attention stops at every end-of-document token, whose own (cross-document) target is not trained on.
- ``MixDataset``: megatron's blending index (``build_blending_indices``, the one its ``BlendedDataset``
  uses) over those datasets with the mix weights, so the mix is a mix of samples per source.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets import helpers
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from train.batches import window_sample


def blend_index(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, its index within that dataset): megatron's greedy blending."""
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    helpers.build_blending_indices(dataset_index, sample_index, w / w.sum(), len(weights), size, False)
    return dataset_index, sample_index


def samples_per_source(weights: list[float], size: int) -> list[int]:
    """How many samples each source gives to a blend of ``size`` samples."""
    dataset_index, _ = blend_index(weights, size)
    return np.bincount(dataset_index, minlength=len(weights)).tolist()


class WindowDataset(torch.utils.data.Dataset):
    """Selected windows of one category: sample i is window ``order[i]`` alone."""

    def __init__(self, prefix: str, num_samples: int, seq_length: int, seed: int):
        self.indexed = IndexedDataset(prefix)
        n = len(self.indexed)
        rng = np.random.RandomState(seed)
        epochs = -(-num_samples // n)
        self.order = np.concatenate([rng.permutation(n) for _ in range(epochs)])[:num_samples]
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.order)

    def documents(self, i: int) -> list[int]:
        return [int(self.order[i])]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return window_sample(self.indexed.get(int(self.order[i])), self.seq_length)


class _TokenizerInfo:
    """What GPTDataset reads from a tokenizer: the vocabulary size and the end-of-document id (no pad)."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        # GPTDataset hashes its config, tokenizer included, into the names of its index caches.
        self.unique_identifiers = {"class": "TokenizerInfo", "vocab_size": vocab_size, "eod": eod}


class PackedDataset(GPTDataset):
    """megatron's GPTDataset over one short source, with per-document positions, attention and loss."""

    def documents(self, i: int) -> list[int]:
        _, docs = self._query_document_sample_shuffle_indices(i)
        return [int(d) for d in docs]


def packed_dataset(prefix: str, num_samples: int, seq_length: int, seed: int, vocab_size: int, eod: int,
                   cache_dir: Path) -> PackedDataset:
    cfg = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
        path_to_cache=str(cache_dir), tokenizer=_TokenizerInfo(vocab_size, eod),
        reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True,
        # Masks come from the positions (train.batches): an [L, L] mask per sample costs 1 GB at 32k.
        create_attention_mask=False)
    indexed = IndexedDataset(prefix)
    return PackedDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), num_samples, Split.train, cfg)


class MixDataset(torch.utils.data.Dataset):
    """Samples of several sources interleaved by weight; sample i is a pure function of i."""

    def __init__(self, names: list[str], datasets: list[Any], weights: list[float], size: int,
                 ids: dict[str, str] | None = None):
        self.names, self.datasets = names, datasets
        self.dataset_index, self.sample_index = blend_index(weights, size)
        self._ids_paths = ids or {}
        self._ids: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[self.dataset_index[i]][int(self.sample_index[i])]

    def describe(self, i: int) -> dict[str, Any]:
        """The preview row of sample i: its source, the ids of the windows/documents it holds, its tokens."""
        d = int(self.dataset_index[i])
        name, ds, j = self.names[d], self.datasets[d], int(self.sample_index[i])
        sample = ds[j]
        ids = self._doc_ids(name)
        return {"sample": i, "source": name, "data_ids": [ids[k] for k in ds.documents(j)],
                "n_tokens": int(sample["loss_mask"].sum()),
                "n_documents": int((sample["position_ids"] == 0).sum())}

    def _doc_ids(self, name: str) -> list[str]:
        if name not in self._ids:
            lines = Path(self._ids_paths[name]).read_text(encoding="utf-8").splitlines()
            self._ids[name] = [json.loads(x) for x in lines]
        return self._ids[name]


def build_mix(manifest: dict[str, Any], cache_dir: Path) -> MixDataset:
    """The blended dataset a ``train.prepare`` manifest describes (index caches under ``cache_dir``)."""
    names, datasets, weights, ids = [], [], [], {}
    length, seed = manifest["seq_length"], manifest["seed"]
    for name, d in manifest["datasets"].items():
        own_seed = seed + zlib.crc32(name.encode()) % 100_003  # distinct orders per source, fixed by the seed
        if d["kind"] == "windows":
            ds = WindowDataset(d["prefix"], d["samples"], length, own_seed)
        else:
            ds = packed_dataset(d["prefix"], d["samples"], length, own_seed, manifest["vocab_size"],
                                manifest["eod"], cache_dir)
        names.append(name)
        datasets.append(ds)
        weights.append(d["weight"])
        ids[name] = d["prefix"] + ".ids"
    return MixDataset(names, datasets, weights, manifest["num_samples"], ids)
