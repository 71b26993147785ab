"""The benchmarks' published source data, fetched once into ``<cache>/sources`` and read from there after.

Each source is fetched only when the run needs it and the cache does not hold it. Offline (no network, or
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set), a missing source is a ``MissingDataError`` naming it and
the ``prepare`` command that fetches it, not the library's raw connection error. What a run reads from here
is keyed by content (eval/cache.py), so a source fetched again with other content makes new data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LONGBENCH_REPO = "THUDM/LongBench"
"""The reference's own data (``data.zip`` of ``<task>.jsonl``, the format ``pred.py`` reads)."""
HUMANEVAL_DATASET = "openai/openai_humaneval"


class MissingDataError(RuntimeError):
    """Data a run needs is neither given as a local file nor in the cache, and cannot be fetched here."""


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@dataclass(frozen=True)
class Source:
    name: str
    """What it is, for messages: ``RULER essay haystack (Paul Graham essays)``."""
    origin: str
    """Where it comes from: a URL or a hub dataset."""
    relpath: str
    """Where its copy lives under ``<cache>/sources``."""
    local: str | None = None
    """How to give a local copy instead: ``suite.ruler.haystack=<text file>``."""
    url: bool = False
    """Fetched with plain HTTP (no hub offline switch of its own)."""


def fetch(src: Source, cache: Path, download: Callable[[Path], None], prepare_cmd: str) -> Path:
    """The cached copy of ``src``, downloading it (to a temporary name, then renamed) when missing."""
    path = cache / "sources" / src.relpath
    if path.exists():
        return path
    reason = "offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if src.url and offline() else None
    if reason is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".part{os.getpid()}")
        try:
            log.info("fetching %s from %s", src.name, src.origin)
            download(tmp)
            tmp.replace(path)
            return path
        except OSError as e:  # requests, datasets and huggingface_hub raise OSError subclasses
            if path.exists():  # another job of a shared cache fetched it meanwhile
                return path
            reason = f"{type(e).__name__}: {e}".strip()[:300]
        finally:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    local = f"\nor give a local copy: {src.local}" if src.local else ""
    raise MissingDataError(f"{src.name} ({src.origin}) is not in the evaluation cache {cache} and cannot be "
                           f"fetched here: {reason}. Fetch it on a node with internet:\n  {prepare_cmd}{local}")


def download_url(url: str) -> Callable[[Path], None]:
    def get(dest: Path) -> None:
        import requests

        r = requests.get(url, timeout=120)
        r.raise_for_status()
        dest.write_bytes(r.content)

    return get


def download_hub_text(dataset: str, field: str = "text", sep: str = " ") -> Callable[[Path], None]:
    """A hub dataset's text column joined into one file (lm-eval joins the essays with a space)."""
    def get(dest: Path) -> None:
        import datasets

        dest.write_text(sep.join(datasets.load_dataset(dataset, split="train")[field]), encoding="utf-8")

    return get


def download_hub_jsonl(dataset: str, split: str) -> Callable[[Path], None]:
    def get(dest: Path) -> None:
        import datasets

        with open(dest, "w", encoding="utf-8") as f:
            for r in datasets.load_dataset(dataset, split=split):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    return get


def download_longbench_zip(dest_dir: Path) -> None:
    """The reference's ``data.zip`` from the hub, unpacked: ``<dest_dir>/<task>.jsonl``."""
    from huggingface_hub import hf_hub_download

    zip_path = hf_hub_download(LONGBENCH_REPO, "data.zip", repo_type="dataset")
    dest_dir.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            if info.filename.endswith(".jsonl"):
                (dest_dir / Path(info.filename).name).write_bytes(z.read(info))
