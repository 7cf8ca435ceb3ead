"""``sora eval --lm-eval``: lm-evaluation-harness tasks on a loaded model (base + SoRA adapter, or merged).

The model object that :func:`sora_dist.inference.load_for_inference` returns is wrapped in the
harness's Hugging Face model class (``lm_eval.models.huggingface.HFLM``) and evaluated with
``lm_eval.simple_evaluate``; tasks are looked up among the harness's own and those of an include
folder (YAML task configs). The harness is the optional extra ``lmeval``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

INSTALL_HINT = "--lm-eval needs lm-evaluation-harness: pip install 'sora_dist[lmeval]'"
MIXED_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def require_lm_eval() -> None:
    """Raise one clear line (a ValueError) when the harness is not installed."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise ValueError(INSTALL_HINT) from None


def parse_tasks(value: str) -> list[str]:
    """``TASK[,TASK...]`` as a list of names, blanks dropped, order kept, no repeats."""
    names: list[str] = []
    for part in value.split(","):
        name = part.strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"--lm-eval: expected one or more task names separated by commas, got {value!r}")
    return names


def task_manager(include: str | None = None):
    """The harness's task index: its own tasks, and those of the ``include`` folder (which win)."""
    from lm_eval.tasks import TaskManager

    if include is not None and not Path(include).is_dir():
        raise FileNotFoundError(f"--lm-eval-include {include}: {'is a file, not' if Path(include).exists() else 'no such'} folder")
    return TaskManager(include_path=include)


def check_tasks(manager, names: Sequence[str]) -> None:
    """Every name must be a task, group or tag the index knows (or a YAML task file)."""
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known and not (name.endswith((".yaml", ".yml")) and Path(name).is_file())]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = " nor in --lm-eval-include" if manager.include_path else "; a task of your own: --lm-eval-include DIR with its YAML"
    raise ValueError(f"--lm-eval: unknown task {', '.join(hints)}: not among lm-evaluation-harness's tasks{where}")


def mixed_precision_dtype(mixed: str | None, device) -> str | None:
    """The autocast dtype of the run's ``distributed.mixed_precision`` (fp16 only on a GPU)."""
    dtype = MIXED_DTYPES.get(mixed or "")
    if dtype == "float16" and getattr(device, "type", "cpu") != "cuda":
        return None
    return dtype


def wrap_model(loaded, batch_size: int, mixed: str | None = None):
    """``loaded.model`` and its tokenizer as the harness's HFLM (a causal LM, one process)."""
    from lm_eval.models.huggingface import HFLM

    if loaded.task != "causal_lm":
        raise ValueError(f"{loaded.description} is a {loaded.task} model: --lm-eval scores causal language models (use --data)")
    quiet = logging.getLogger("lm_eval.models.huggingface")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warnings about a model passed as an object describe exactly this use
    try:
        return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", batch_size=batch_size,
                    mixed_precision_dtype=mixed_precision_dtype(mixed, loaded.device))  # fmt: skip
    finally:
        quiet.setLevel(level)


def run_tasks(loaded, tasks: Sequence[str], manager, batch_size: int, num_fewshot: int | None = None, limit: int | None = None,
              mixed: str | None = None, chat: bool = False, system: str | None = None) -> dict:  # fmt: skip
    """The harness's results of ``tasks`` on ``loaded``, reduced to what JSON can hold (see json_safe).
    ``chat`` renders each prompt as a user turn (few-shot examples as earlier turns) with the
    tokenizer's chat template, after ``system`` when given."""
    import lm_eval

    model = wrap_model(loaded, batch_size, mixed)
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                      batch_size=batch_size, log_samples=False, apply_chat_template=chat, system_instruction=system)  # fmt: skip
    if results is None:
        raise RuntimeError("lm-evaluation-harness returned no results")
    safe = json_safe(results)
    safe["model"] = loaded.description
    return safe


_DROP = object()


def json_safe(value: Any) -> Any:
    """``value`` without what JSON cannot hold: dicts and lists keep their JSON-able members (tuples
    become lists), non-finite floats become None, anything else (functions, dtypes, objects) is left out."""
    result = _json_safe(value)
    return {} if result is _DROP else result


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _json_safe(value.item())
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)):
                continue
            kept = _json_safe(item)
            if kept is not _DROP:
                out[key] = kept
        return out
    if isinstance(value, (list, tuple)):
        return [kept for kept in map(_json_safe, value) if kept is not _DROP]
    return _DROP


def result_rows(results: dict) -> list[tuple[str, str, Any, Any]]:
    """(task, metric, value, stderr) of every metric the harness reported; the metric is named with
    its filter when the filter is not ``none``."""
    rows = []
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if not filter_name or name.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{name}_stderr,{filter_name}")
            rows.append((task, name if filter_name == "none" else f"{name} ({filter_name})", value, stderr))
    return rows


def results_table(results: dict) -> str:
    def shown(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    header = ("task", "metric", "value", "stderr")
    rows = [header] + [(task, metric, shown(value), shown(stderr)) for task, metric, value, stderr in result_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    if len(rows) == 1:
        lines.append("(no metrics reported)")
    return "\n".join(lines)


def write_results(path: str, results: dict) -> None:
    from .deploy.atomic import write_text

    write_text(path, json.dumps(results, indent=2) + "\n")


def one_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--lm-eval runs in one process: start sora eval without torchrun / accelerate launch")
