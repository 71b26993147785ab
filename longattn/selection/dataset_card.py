"""The dataset card (``dataset/README.md``) of a selection run, in the Hugging Face card format: a YAML header
(pretty name, licence, size, tags, ``configs`` per category) and a body that says how the windows were
chosen (method, model, window length, normalisation, alpha, budget), what the dataset holds per category,
the score distributions and the exact command."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import OmegaConf

from longattn.selection.dataset import SCORE_KEYS, hub_license, size_category

if TYPE_CHECKING:
    from longattn.selection.config import SelectRunConfig
    from longattn.selection.dataset import _Stats

__all__ = ["dataset_card", "card_header", "METHODS"]

METHODS = {
    "longattn": "LongAttn (Wu et al., ACL Findings 2025): token-level long-range dependency from the first decoder "
                "layer's self-attention. `ds` is the attention mass on tokens at least L/4 away (DS), `var` the "
                "variance of that far attention (Var, penalised), `lds = norm(ds) - alpha * norm(var)` per category.",
    "longattn_layers": "LongAttn's DS / Var computed from other layers or heads of the model (beyond the paper); "
                       "`lds = norm(ds) - alpha * norm(var)` per category.",
    "prolong": "ProLong (Chen et al., ACL 2024): 128-token chunks; `ds` is ProLong's dependency score (perplexity "
               "drop of a chunk given an earlier one, distance gain, dependency specificity), `var` is 0, so "
               "`lds` is the normalised ProLong score.",
    "random": "Random windows to the same budget (the paper's D_R baseline): `ds` is a uniform number from "
              "(seed, data_id), `var` is 0.",
}
"""What each scorer's numbers mean (docs/method.md §2-5)."""

FIELDS = {
    "content": "the window's text (decoded from its tokens)",
    "data_id": "window id (`<category>_<7 digits>`)",
    "category": "category of the source document",
    "source_id": "id of the source document (its `id` field, else file:line)",
    "token_start": "first token of the window in the tokenised source document",
    "token_end": "end (exclusive) of the window in the tokenised source document",
    "n_tokens": "tokens in the window (the window length W)",
    "ds": "the scorer's first score (DS for LongAttn; the ProLong / random score otherwise)",
    "var": "the scorer's second score (Var for LongAttn; 0 otherwise)",
    "lds": "the selection score the windows were ranked by, normalised within the category",
    "license": "licence of the source document, as the input record states it",
}


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"


def card_header(cfg: SelectRunConfig, stats: dict[str, _Stats], files: dict[str, list[str]]) -> dict[str, Any]:
    n = sum(s.rows for s in stats.values())
    licenses = sorted({lic for s in stats.values() for lic in s.licenses})
    cats = sorted(files)
    configs: list[dict[str, Any]] = [{"config_name": "all" if "all" not in cats else "all_categories",
                                      "default": True, "data_files": [{"split": "train", "path": "data/*/*.parquet"}]}]
    configs += [{"config_name": c, "data_files": [{"split": "train", "path": f"data/{c}/*.parquet"}]} for c in cats]
    return {"pretty_name": cfg.dataset.pretty_name or _title(cfg), **hub_license(licenses),
            "size_categories": [size_category(n)], "task_categories": ["text-generation"],
            "tags": [*cfg.dataset.tags, cfg.scorer.name], "configs": configs}


def _title(cfg: SelectRunConfig) -> str:
    return f"{cfg.scorer.name} selection with {cfg.model.name}, {cfg.window.length}-token windows"


def _budget(cfg: SelectRunConfig) -> str:
    s = cfg.select
    if s.tokens is not None:
        return f"per category, the best windows by `lds` while their tokens fit `select.tokens={float(s.tokens):g}`"
    return f"per category, the best `select.fraction={s.fraction}` of the windows by `lds`"


def _model(cfg: SelectRunConfig) -> str:
    m = cfg.model
    where = m.path or (f"`{m.gguf_file}` from PyPI `{m.package}`" if m.package else "")
    theta = f", RoPE base {m.rope_theta:g}" if m.rope_theta else ""
    return f"`{m.name}` ({m.source}{': ' + where if where else ''}{theta}, {m.dtype})"


def _how(cfg: SelectRunConfig) -> list[str]:
    scorer = OmegaConf.to_container(OmegaConf.structured(cfg.scorer))
    overlap = getattr(cfg.select, "overlap", None)
    lines = [
        "## How the windows were selected", "",
        f"- **Input**: {', '.join(f'`{p}`' for p in cfg.data.paths)}"
        + (" (windows given as input)" if cfg.data.preprocessed else "") + ".",
        f"- **Method**: `scorer={cfg.scorer.name}`. {METHODS.get(cfg.scorer.name, '')}",
        f"- **Model**: {_model(cfg)}.",
        f"- **Window length**: W = {cfg.window.length} tokens (documents cut from both ends towards the middle, "
        "Algorithm 1 of the LongAttn paper)"
        + (f"; a seeded sample of {cfg.window.sample_size} windows per category" if cfg.window.sample_size else "")
        + ".",
        f"- **Normalisation**: `{cfg.select.normalize}` within each category; **alpha** = {cfg.select.alpha:g}.",
        f"- **Budget**: {_budget(cfg)}" + (f"; overlapping windows: `{overlap}`" if overlap is not None else "") + ".",
        "- **Scorer settings**: " + ", ".join(f"`{k}={v}`" for k, v in scorer.items()) + ".",
    ]
    return lines


def _contents(metrics: dict[str, Any], stats: dict[str, _Stats]) -> list[str]:
    head = "| category | windows in | kept | tokens in | tokens kept | " + " | ".join(
        f"{k} kept (min / mean / max)" for k in SCORE_KEYS) + " |"
    lines = ["## Contents", "", head, "|---|" + "---:|" * (4 + len(SCORE_KEYS))]
    for cat, s in sorted(stats.items()):
        m = metrics.get("categories", {}).get(cat, {})
        scores = [f"{_fmt(s.lo[k])} / {_fmt(s.total[k] / s.rows)} / {_fmt(s.hi[k])}" for k in SCORE_KEYS]
        lines.append(f"| {cat} | {m.get('windows_in', '–')} | {s.rows} | {m.get('tokens_in', '–')} | {s.tokens} | "
                     + " | ".join(scores) + " |")
    lines += ["", f"Total: {sum(s.rows for s in stats.values())} windows, {sum(s.tokens for s in stats.values())} "
              "tokens. `windows in` counts the scored windows of the category, `tokens in` their tokens."]
    return lines


def _fields(columns: list[str]) -> list[str]:
    return ["## Fields", "", "| column | meaning |", "|---|---|",
            *(f"| `{c}` | {FIELDS[c]} |" for c in columns if c in FIELDS)]


def _licence(stats: dict[str, _Stats]) -> list[str]:
    per: dict[str, int] = {}
    for s in stats.values():
        for lic, k in s.licenses.items():
            per[lic] = per.get(lic, 0) + k
    if not per:
        return ["## Licence", "", "The input records carry no `license` field: check the licence of the source "
                "corpus before sharing this dataset."]
    return ["## Licence", "", "Carried from the `license` field of each source document (column `license`):", "",
            "| licence | kept windows |", "|---|---:|", *(f"| {k} | {v} |" for k, v in sorted(per.items()))]


def dataset_card(cfg: SelectRunConfig, metrics: dict[str, Any], stats: dict[str, _Stats],
                 files: dict[str, list[str]], columns: list[str], command: str) -> str:
    """The card's text; ``columns`` are the Parquet columns written, ``command`` the run's command line."""
    header = yaml.safe_dump(card_header(cfg, stats, files), sort_keys=False, allow_unicode=True)
    body = [
        f"# {cfg.dataset.pretty_name or _title(cfg)}", "",
        f"Long-context training windows kept by a LongAttn-project selection run: "
        f"{sum(s.rows for s in stats.values())} windows of {cfg.window.length} tokens in {len(stats)} "
        f"categories ({', '.join(sorted(stats))}).", "",
        *_how(cfg), "", *_contents(metrics, stats), "",
        "## Score distributions", "",
        "DS, Var and LDS per category, kept against rejected windows, the LDS threshold marked "
        "(the run's `report.png`):", "", "![score distributions](report.png)", "",
        *_fields(columns), "", *_licence(stats), "",
        "## Loading", "", "```python", "import datasets",
        "ds = datasets.load_dataset(\"parquet\", data_dir=\"path/to/dataset\")[\"train\"]   # every category",
        f"one = datasets.load_dataset(\"path/to/dataset\", \"{sorted(stats)[0] if stats else 'all'}\")   "
        "# one category (the card's configs)", "```", "",
        "## Reproduce", "", "The command that made it (`selection_config.yaml` holds the resolved config):", "",
        "```bash", command, "```", "",
    ]
    return f"---\n{header}---\n\n" + "\n".join(body)
