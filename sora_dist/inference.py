"""Use what ``sora-train`` wrote: load a model to talk to, run over a data file, or score.

What can be loaded (:func:`load_for_inference`):

- a run folder (``config.yaml`` + ``adapter/``, or only checkpoints): the base model, its dtype and
  quantization come from the run's config, the adapter from the folder (sources.resolve_adapter);
  a checkpoint or stage folder inside a run finds the run's ``config.yaml`` above it;
- a merged model folder (a plain transformers folder, as ``sora-merge`` writes);
- an explicit base model and adapter.

By default the adapter stays unmerged, pruned to its live ranks; ``merge`` folds it into the base
weights first. :func:`chat_session`, :func:`generate_file` and :func:`evaluate_file` are what the
``sora chat``, ``sora generate`` and ``sora eval`` commands run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO

import torch
import yaml
from torch import nn

from .backends.dtypes import LONG_NAMES, torch_dtype
from .config import build_section
from .core import merge_sora, prune_sora
from .data.chat import check_messages
from .data.formats import DataError, encode_instruction
from .deploy.io import CONFIG_NAME, apply_adapter
from .deploy.layout import ADAPTER_DIR, CONFIG_FILE
from .deploy.sources import resolve_adapter
from .models import load_model, load_tokenizer

GENERATION_FORMATS = ("chat", "instruction", "text")
CLASSIFIER_HEADS = ("score", "classifier")


@dataclasses.dataclass
class Loaded:
    """A model ready to generate or be evaluated, its tokenizer, and where they came from."""

    model: nn.Module
    tokenizer: Any
    description: str
    run: dict | None  # the run's config.yaml (raw) when the model came from a run folder
    task: str
    device: torch.device

    @property
    def data_settings(self):
        """The run's data section (defaults where the model did not come from a run)."""
        from .data.config import DataConfig

        raw = (self.run or {}).get("data") or {}
        if raw:
            return build_section("data", raw)
        return DataConfig(train_file="-")


def inference_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def find_run_config(path: Path) -> Path | None:
    """The ``config.yaml`` of the run ``path`` belongs to: in it, or one or two folders up
    (``checkpoints/step-N``, ``stages/stage-K``)."""
    for folder in [path, *list(path.resolve().parents)[:2]]:
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    return None


def read_run_config(file: Path) -> dict:
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: cannot read the run's config: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{file}: not a sora-train run config (no model section)")
    return raw


def model_settings(run: dict | None, meta: dict | None, dtype: str | None) -> dict:
    """load_model's keyword arguments: from the run's model section, else from the quantization the
    adapter records of its base, else the model folder's own dtype; ``dtype`` overrides."""
    if run is not None:
        cfg = build_section("model", run["model"])
        settings = {"task": cfg.task, "dtype": torch_dtype(cfg.dtype), "quantization": cfg.quantization, "quant_type": cfg.bnb_4bit_quant_type,
                    "double_quant": cfg.bnb_4bit_double_quant, "compute_dtype": torch_dtype(cfg.bnb_4bit_compute_dtype),
                    "trust_remote_code": cfg.trust_remote_code}  # fmt: skip
    else:
        settings = {"dtype": "auto" if meta is None else torch.float32}
        quant = (meta or {}).get("base_quantization") or {}
        if quant.get("load_in_4bit"):
            compute = str(quant.get("bnb_4bit_compute_dtype", "bfloat16")).removeprefix("torch.")
            settings.update(quantization="4bit", quant_type=quant.get("bnb_4bit_quant_type", "nf4"),
                            double_quant=bool(quant.get("bnb_4bit_use_double_quant", True)),
                            compute_dtype=torch_dtype(compute if compute in LONG_NAMES else "bfloat16"))  # fmt: skip
            settings["dtype"] = settings["compute_dtype"]
        elif quant.get("load_in_8bit"):
            settings["quantization"] = "8bit"
        if meta is not None and meta.get("task"):
            settings["task"] = meta["task"]
    if dtype is not None:
        settings["dtype"] = torch_dtype(dtype, "--dtype")
    return settings


def head_size(meta: dict, tensors: dict[str, torch.Tensor]) -> int | None:
    """Classes of a classifier whose head was trained in full with the adapter."""
    for name in meta.get("trainable", []):
        if name.split(".")[0] in CLASSIFIER_HEADS and name.endswith("weight"):
            return int(tensors[name].shape[0])
    return None


def resolve_sources(model: str | None, base: str | None, adapter: str | None) -> tuple[str, str | None, dict | None]:
    """(base model path, adapter path or None, run config or None) from the command's arguments."""
    if model is not None and (base is not None or adapter is not None):
        raise ValueError("give either MODEL (a run or model folder) or --base/--adapter, not both")
    if model is None:
        if base is None:
            raise ValueError("give MODEL (a run folder written by sora-train, or a model folder), or --base PATH [--adapter PATH]")
        if adapter is not None and not Path(adapter).exists():
            raise FileNotFoundError(f"--adapter {adapter}: no such adapter, run or checkpoint folder")
        run_file = find_run_config(Path(adapter)) if adapter is not None else None
        return base, adapter, read_run_config(run_file) if run_file is not None else None
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"{model}: {'is a file, not' if path.exists() else 'no such'} run or model folder")
    if (path / "config.json").is_file() and not (path / ADAPTER_DIR).exists():
        return model, None, None
    run_file = find_run_config(path)
    if run_file is not None:
        run = read_run_config(run_file)
        return str(run["model"].get("path", "")), model, run
    if (path / CONFIG_NAME).is_file():
        raise ValueError(f"{model}: an adapter folder without its run's {CONFIG_FILE}: give --base BASE_MODEL --adapter {model}")
    raise FileNotFoundError(f"{model}: neither a run folder ({CONFIG_FILE} + {ADAPTER_DIR}/, as sora-train writes) nor a model folder (config.json)")


def load_for_inference(model: str | None = None, base: str | None = None, adapter: str | None = None, merge: bool = False,
                       dtype: str | None = None, device: torch.device | None = None, verbose: bool = True) -> Loaded:  # fmt: skip
    """The model and tokenizer of a run folder, a model folder, or ``base`` + ``adapter``, in eval mode."""
    base_path, adapter_path, run = resolve_sources(model, base, adapter)
    meta = tensors = where = None
    if adapter_path is not None:
        meta, tensors, where = resolve_adapter(adapter_path)
    settings = model_settings(run, meta, dtype)
    task = settings.get("task", "causal_lm")
    if task == "sequence_classification" and meta is not None:
        settings["num_labels"] = head_size(meta, tensors)
    device = device or inference_device()
    tokenizer = load_tokenizer(base_path, settings.get("trust_remote_code", False))
    loaded = load_model(base_path, **settings)
    quantized = settings.get("quantization", "none") != "none"
    description = base_path
    if meta is not None:
        apply_adapter(loaded, meta, tensors, where)
        if merge:
            merge_sora(loaded, dtype=settings["dtype"] if quantized else None)
            description = f"{base_path} with {where} merged"
        else:
            prune_sora(loaded)
            description = f"{base_path} with {where} (pruned to its live ranks)"
    if not quantized:
        loaded.to(device)
    loaded.eval()
    if verbose:
        print(f"loaded {description}", file=sys.stderr, flush=True)
    return Loaded(loaded, tokenizer, description, run, task, device)


# -- prompts ----------------------------------------------------------------------------------------
def detect_format(row: dict, where: str) -> str:
    if row.get("messages") is not None or row.get("conversations") is not None:
        return "chat"
    if "instruction" in row:
        return "instruction"
    if "text" in row:
        return "text"
    raise DataError(f"{where}: cannot tell the format: expected 'messages' (chat), 'instruction' or 'text', got {sorted(row)}")


def row_messages(row: dict, where: str, need_assistant: bool = True) -> list[dict]:
    from .data.pipeline import sharegpt_messages

    messages = row.get("messages")
    if messages is None and row.get("conversations") is not None:
        messages = sharegpt_messages(row["conversations"], where)
    return check_messages(messages, where, need_assistant)


def chat_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template and its generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def require_chat_template(tokenizer, what: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{what} needs a tokenizer with a chat template, and this one has none")


def prompt_ids(row: dict, format: str, tokenizer, where: str) -> list[int]:
    """The prompt of one row: a conversation up to its last assistant message (all of it when it ends
    with another role) with the generation prompt; an instruction as training builds it; a text."""
    if format == "chat":
        messages = row_messages(row, where, need_assistant=False)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise DataError(f"{where}: the conversation has nothing before its assistant message to prompt with")
        return chat_prompt(messages, tokenizer)
    if format == "instruction":
        encoded = encode_instruction({**row, "output": "."}, tokenizer, where)
        return list(encoded["input_ids"][: encoded["prompt_length"]])
    if format == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: field 'text' must be non-empty text")
        return list(tokenizer(text)["input_ids"])
    raise DataError(f"format must be one of {GENERATION_FORMATS}, got {format!r}")


def sampling_kwargs(temperature: float, top_p: float, max_new_tokens: int, tokenizer) -> dict:
    """model.generate's arguments: greedy at temperature 0 (the default), else sampling."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": pad}
    if temperature > 0:
        return {**kwargs, "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": None}
    return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@torch.no_grad()
def complete(loaded: Loaded, prompts: Sequence[list[int]], generation: dict) -> list[str]:
    """One left-padded batch of prompts, generated and decoded (special tokens dropped)."""
    tokenizer = loaded.tokenizer
    pad = generation["pad_token_id"]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=loaded.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=loaded.device)
    out = loaded.model.generate(input_ids=ids, attention_mask=mask, **generation)
    return [tokenizer.decode(generated, skip_special_tokens=True) for generated in out[:, width:]]


# -- data files ---------------------------------------------------------------------------------------
def read_rows(path: str) -> list[dict]:
    """Every row of a data file, as written (JSON lines are read as they are; other sources through
    the training pipeline's loader)."""
    from .data.pipeline import data_path, load_source

    resolved = data_path(path, "--data")
    file = Path(resolved)
    if file.is_file() and file.suffix.lower() == ".jsonl":
        rows = []
        with open(file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:row {number}: invalid JSON: {err.msg}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:row {number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    else:
        rows = load_source(resolved, "--data").to_list()
    if not rows:
        raise DataError(f"--data {path}: no rows")
    return rows


def world() -> tuple[int, int]:
    """(rank, world size) of this process; with several, a gloo process group is started."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def generate_file(loaded: Loaded, data: str, out: str, format: str | None = None, batch_size: int = 8, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0) -> int:  # fmt: skip
    """Write ``out`` (JSON lines): every row of ``data`` with its ``completion``, in input order.

    The rows are cut into batches in input order; with several processes each takes every
    world-th batch, and rank 0 gathers the completions and writes the file, so the result is the
    same as one process's. Returns the number of rows written (0 on other ranks)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from .deploy.atomic import write_lines

    rank, size = world()
    rows = read_rows(data)
    format = format or detect_format(rows[0], f"{data}:row 1")
    prompts = [prompt_ids(row, format, loaded.tokenizer, f"{data}:row {i + 1}") for i, row in enumerate(rows)]
    generation = sampling_kwargs(temperature, top_p, max_new_tokens, loaded.tokenizer)
    starts = list(range(0, len(rows), batch_size))[rank::size]
    mine: dict[int, str] = {}
    with tqdm(total=sum(len(prompts[s : s + batch_size]) for s in starts), desc="generate", unit="row", file=sys.stderr,
              disable=rank != 0, dynamic_ncols=True) as bar:  # fmt: skip
        for start in starts:
            batch = prompts[start : start + batch_size]
            for offset, text in enumerate(complete(loaded, batch, generation)):
                mine[start + offset] = text
            bar.update(len(batch))
    if size > 1:
        gathered: list = [None] * size
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            mine.update(part)
    if rank != 0:
        return 0
    write_lines(out, (json.dumps({**row, "completion": mine[i]}, ensure_ascii=False, default=str) + "\n" for i, row in enumerate(rows)))
    return len(rows)


# -- chat -----------------------------------------------------------------------------------------------
def reply_streamer(tokenizer, out: TextIO, one_line: bool):
    """A TextStreamer writing to ``out``; ``one_line`` keeps a reply on one line (newlines become spaces)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if one_line:
                text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


HELP_LINE = "type a message; /reset starts over, /exit (or Ctrl-D) leaves"


def chat_session(loaded: Loaded, stdin: TextIO, stdout: TextIO, system: str | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, max_new_tokens: int = 512, interactive: bool | None = None) -> int:  # fmt: skip
    """Talk with the model. Piped (stdin not a terminal): one user message per line in, one reply per
    line out, nothing else on stdout, the conversation kept across lines. Returns the replies made."""
    tokenizer = loaded.tokenizer
    require_chat_template(tokenizer, "chat")
    interactive = stdin.isatty() if interactive is None else interactive
    generation = sampling_kwargs(temperature, top_p, max_new_tokens, tokenizer)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    replies = 0
    if interactive:
        print(f"chatting with {loaded.description}; {HELP_LINE}", file=sys.stderr, flush=True)
    while True:
        if interactive:
            stdout.write("\n>>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            if interactive:
                stdout.write("\n")
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = list(start)
            if interactive:
                print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        if interactive and not command:
            continue
        messages.append({"role": "user", "content": text})
        ids = torch.tensor([chat_prompt(messages, tokenizer)], device=loaded.device)
        streamer = reply_streamer(tokenizer, stdout, one_line=not interactive)
        try:
            with torch.no_grad():
                out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **generation)
        except KeyboardInterrupt:
            if not interactive:
                raise
            messages.pop()
            print("\n(interrupted; that turn is dropped)", file=sys.stderr, flush=True)
            continue
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply.strip()})
        replies += 1
    return replies


# -- evaluation --------------------------------------------------------------------------------------
def eval_format(loaded: Loaded, rows_columns: Sequence[str], requested: str | None) -> str:
    """The data format: as asked, else the run's when the data has its columns, else from the columns."""
    from .data.pipeline import required_columns

    if requested:
        return requested
    run_format = loaded.data_settings.format if loaded.run else None
    if loaded.task == "sequence_classification":
        return "classification"
    if run_format and run_format != "classification":
        needed = required_columns("text" if run_format == "blocks" else run_format)
        if any(set(option) <= set(rows_columns) for option in needed):
            return run_format
    return detect_format({c: "" for c in rows_columns}, "--data")


def evaluate_file(loaded: Loaded, data: str, format: str | None = None, max_length: int | None = None, batch_size: int | None = None,
                  generate_tokens: int | None = None, accelerator=None) -> dict:  # fmt: skip
    """Held-out metrics of ``data`` as the training loop's evaluation computes them (make_evaluator):
    loss and perplexity, generated-answer accuracy for chat and instruction data, or the
    classification metrics of a classifier. The data is tokenized as training tokenizes it."""
    import functools

    from .data.collate import pad_collate
    from .data.pipeline import blocks_examples, data_path, load_source, prepare_split
    from .training.evaluate import make_evaluator

    settings = loaded.data_settings
    max_length = max_length or settings.max_length
    batch_size = batch_size or settings.eval_batch_size
    source = data_path(data, "--data")
    columns = load_source(source, "--data").column_names if settings.columns is None else list(settings.columns)
    format = eval_format(loaded, columns, format)
    label_names = None
    if format == "classification" and loaded.run is not None:
        label_names = run_label_names(settings)
    common = {"tokenizer": loaded.tokenizer, "format": format, "max_length": max_length, "on_error": settings.on_error,
              "columns": settings.columns, "mask_history": settings.mask_history, "seed": 0,
              "num_proc": settings.num_proc or min(8, os.cpu_count() or 1), "cache": settings.cache,
              "num_labels": loaded.model.config.num_labels if format == "classification" else None}  # fmt: skip
    if format == "blocks":
        examples = blocks_examples(source, loaded.tokenizer, max_length)
    else:
        examples = prepare_split([source], "--data", label_names=label_names, **common)
    if generate_tokens is None:
        generate_tokens = settings.eval_generate_tokens or 32
    if format not in ("chat", "instruction"):
        generate_tokens = 0
    pad = loaded.tokenizer.pad_token_id
    collate = functools.partial(pad_collate, pad_id=pad, pad_to_multiple_of=8)
    num_labels = loaded.model.config.num_labels if format == "classification" else 2
    evaluate = make_evaluator(loaded.task, examples, collate, batch_size, accelerator, loaded.tokenizer, num_labels, generate_tokens)
    metrics = evaluate(loaded.model)
    return {"data": data, "format": format, "examples": len(examples), "skipped_rows": examples.skipped_count, "max_length": max_length,
            "generate_tokens": generate_tokens, **metrics}  # fmt: skip


def run_label_names(settings) -> list[str] | None:
    """The class names of the run's training data, in the order training numbered them."""
    from .data.pipeline import label_names_of, load_sources

    try:
        raw = load_sources(settings.sources, "data.train_file", "classification", settings.columns, None, 0)
    except (DataError, OSError):
        return None
    return label_names_of(raw, "classification")


def metrics_table(result: dict) -> str:
    keys = [k for k in ("data", "format", "examples", "skipped_rows", "eval_loss", "perplexity", "generated_accuracy") if k in result]
    keys += [k for k in result if k not in keys and k not in ("max_length", "generate_tokens", "model")]
    width = max(map(len, keys))
    lines = []
    for key in keys:
        value = result[key]
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
