"""The ``sora-train`` recipe: a validated RunConfig in, a trained adapter and its reports out.

accelerator -> tokenizer and data (cheap errors first) -> model -> SoRA -> resolved config
(budget mode's gate lr) -> experiment trackers (train.report_to) -> config written to ``config.yaml``
-> train -> reports. With a
``sparsity_schedule`` section, "train" is the staged run of training/stages.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import torch
import yaml

from .backends import accelerate as engine
from .backends.dtypes import torch_dtype
from .backends.varlen import use_varlen_attention
from .config import RunConfig
from .core.inject import inject_sora
from .core.report import sparsity_report
from .data.collate import pad_collate
from .data.packing import PackedExamples, collate_packed
from .data.pipeline import Examples, blocks_examples, data_path, prepare_split, split_holdout
from .data.preview import data_figures, first_example, format_figures, marking_note, preview_examples, use_color
from .deploy.atomic import write_text
from .deploy.layout import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE
from .models import load_model, load_tokenizer
from .options import ConfigError
from .sparsity.budget import BudgetController, budget_target, gate_lr_for_budget
from .sparsity.plots import plot_budget
from .training.evaluate import make_evaluator
from .training.loop import train
from .training.lr import lr_factor
from .training.stages import run_stages
from .training.trackers import active_trackers, start_trackers

CLASSIFIER_HEADS = ("score", "classifier")


def load_data(cfg: RunConfig, tokenizer, accelerator=None) -> tuple[Examples, Examples | None]:
    """Tokenized train and validation sets (from their sources or a seeded held-out fraction).

    The main process prepares (or finds in the cache) each set first; the other ranks then load
    what it wrote instead of tokenizing again. Without ``accelerator`` (one process, no run: the
    data preview) the sets are prepared the same way, with the same cache.
    """
    data = cfg.data
    common = {"tokenizer": tokenizer, "format": data.format, "max_length": data.max_length, "on_error": data.on_error,
              "columns": data.columns, "mask_history": data.mask_history, "seed": cfg.train.seed,
              "num_proc": data.num_proc or min(8, os.cpu_count() or 1), "cache": data.cache,
              "num_labels": cfg.model.num_labels if cfg.model.task == "sequence_classification" else None}  # fmt: skip
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        if data.format == "blocks":
            train_set = blocks_examples(data_path(data.sources[0], "data.train_file"), tokenizer, data.max_length)
        else:
            train_set = prepare_split(data.sources, "data.train_file", weights=data.train_weights, **common)
        val_set = None
        if data.validation_file and data.format == "blocks":
            val_set = blocks_examples(data_path(data.validation_file, "data.validation_file"), tokenizer, data.max_length)
        elif data.validation_file:
            val_set = prepare_split([data.validation_file], "data.validation_file", label_names=train_set.label_names, **common)
    if data.validation_fraction:
        train_set, val_set = split_holdout(train_set, data.validation_fraction, cfg.train.seed)
    if val_set is not None and data.eval_max_examples:
        val_set = val_set.select(range(min(data.eval_max_examples, len(val_set))))
    return train_set, val_set


def report_skipped(train_set: Examples, val_set: Examples | None) -> None:
    """One line per set that lost rows: how many, and the first with its reason."""
    for name, examples in (("training", train_set), ("validation", val_set)):
        if examples is not None and examples.skipped_count:
            first = next(iter(examples.skipped.items()))
            print(f"skipped {examples.skipped_count} {name} rows that cannot be used (first: {first[0]}: {first[1]})", flush=True)


def preview_data(cfg: RunConfig, count: int, color: bool | None = None) -> None:
    """``sora-train CONFIG --preview``: the tokenizer and the data exactly as the run would load
    them (same cache), ``count`` training examples with their trained tokens marked, and the
    figures of each set. The model is not loaded."""
    color = use_color() if color is None else color
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    train_set, val_set = load_data(cfg, tokenizer)
    report_skipped(train_set, val_set)
    if count > 0:
        what = "text -> label" if train_set.format == "classification" else marking_note(color)
        shown = min(count, len(train_set))
        print(f"first {shown} training example{'' if shown == 1 else 's'} of {cfg.data.format!r} data ({what}):\n", flush=True)
        print(preview_examples(train_set, tokenizer, count, color) + "\n", flush=True)
    print(format_figures(data_figures(train_set), "training"), flush=True)
    if val_set is not None:
        print(format_figures(data_figures(val_set), "validation"), flush=True)


def training_rows(cfg: RunConfig, train_set: Examples, pad_id: int, main: bool):
    """What the loop batches: the examples, or packed rows (data.packing); their collate function;
    and their lengths for length-grouped batching (data.group_by_length)."""
    if cfg.data.packing:
        packed = PackedExamples(train_set, cfg.data.max_length)
        if main:
            print(f"packing: {len(train_set):,} examples in {len(packed):,} rows of {cfg.data.max_length} tokens, "
                  f"{100 * packed.useful_fraction():.1f}% of them example tokens", flush=True)  # fmt: skip
        return packed, functools.partial(collate_packed, pad_id=pad_id), None
    lengths = train_set.lengths if cfg.data.group_by_length else None
    return train_set, functools.partial(pad_collate, pad_id=pad_id, pad_to_multiple_of=8), lengths


def num_labels_of(cfg: RunConfig, train_set: Examples) -> int | None:
    if cfg.model.task != "sequence_classification":
        return None
    if cfg.model.num_labels:
        return cfg.model.num_labels
    if train_set.label_names:
        return len(train_set.label_names)
    return max(int(row[0]) for row in train_set.dataset["labels"]) + 1


def sora_config_for(cfg: RunConfig, model):
    """The SoRA config; a classifier's freshly initialised head is trained in full by default."""
    sora = cfg.sora
    if cfg.model.task == "sequence_classification" and not sora.modules_to_save:
        heads = [name for name in CLASSIFIER_HEADS if hasattr(model, name)]
        sora = dataclasses.replace(sora, modules_to_save=heads[:1])
    return sora


def budget_controller(cfg: RunConfig, model) -> BudgetController:
    """The λ controller of budget mode, on the bare ``model`` (every rank measures it after each step)."""
    budget = cfg.sparsity_budget
    target, unit = budget_target(sparsity_report(model), budget.target_rank, budget.target_params)
    return BudgetController(model, target, budget.by_step, unit, budget.lambda_max, budget.trajectory)


def resolve(cfg: RunConfig, model, main: bool) -> RunConfig:
    """The config the run really uses: in budget mode without train.gate_lr, the gate lr that lets
    the gates shrink in time (sparsity/budget.py) is filled in, so ``config.yaml`` records it."""
    if cfg.sparsity_budget is None or cfg.train.gate_lr is not None:
        return cfg
    if (cfg.train.gate_update, cfg.train.threshold) != ("prox_adam", "lr_scaled"):
        return cfg
    factors = [lr_factor(step, cfg.train) for step in range(cfg.train.steps)]
    gate_lr = gate_lr_for_budget(model, factors, cfg.sparsity_budget.by_step, cfg.sparsity_budget.lambda_max)
    if main:
        print(f"budget mode: gate learning rate {gate_lr:.3g} (set train.gate_lr to choose it yourself)", flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gate_lr=gate_lr))


def steps_from_epochs(cfg: RunConfig, rows: int, processes: int, main: bool) -> RunConfig:
    """train.epochs -> train.steps: enough optimizer steps for that many passes over the rows (the
    resolved config, as config.yaml records it, then says steps)."""
    if not cfg.train.epochs:
        return cfg
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * processes
    steps = max(1, math.ceil(cfg.train.epochs * rows / per_step))
    if main:
        print(f"train.epochs {cfg.train.epochs:g}: {steps} optimizer steps of {per_step} rows ({rows:,} rows)", flush=True)
    if cfg.sparsity_budget is not None and cfg.sparsity_budget.by_step > steps:
        raise ConfigError(f"sparsity_budget.by_step: {cfg.sparsity_budget.by_step} is past the {steps} steps train.epochs {cfg.train.epochs:g} makes")
    try:
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, epochs=0.0))
    except ValueError as err:
        raise ConfigError(f"train.epochs: {cfg.train.epochs:g} epochs make {steps} steps: {str(err).replace('TrainConfig.', 'train.')}") from None


MAX_PASSES_PER_STEP = 1000  # one optimizer step over the data more often than this is a typo


def check_batch_size(cfg: RunConfig, rows: int, processes: int, main: bool) -> None:
    """An optimizer step that needs more rows than the training set holds repeats rows (said once);
    one that would pass over the data more than MAX_PASSES_PER_STEP times (micro_batch_size: 1e9)
    is refused rather than building one endless batch."""
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * processes
    sizes = f"train.micro_batch_size {cfg.train.micro_batch_size} x train.grad_accum {cfg.train.grad_accum} x {processes} processes"
    if per_step > MAX_PASSES_PER_STEP * rows:
        raise ConfigError(f"train.micro_batch_size: {sizes} = {per_step:,} rows per optimizer step, over {MAX_PASSES_PER_STEP} "
                          f"times the {rows:,} training rows: lower micro_batch_size or grad_accum")  # fmt: skip
    if per_step > rows and main:
        print(f"note: {sizes} = {per_step:,} rows per optimizer step, more than the {rows:,} training rows: rows repeat within a step",
              flush=True)  # fmt: skip


def write_budget_plot(controller: BudgetController, output_dir: str | Path) -> None:
    metrics = Path(output_dir) / METRICS_FILE
    if not metrics.is_file():
        return
    try:
        plot_budget(metrics, Path(output_dir) / "budget.png", controller, controller.unit)
    except ImportError:
        print("matplotlib is not installed: skipped budget.png", flush=True)


def run_training(cfg: RunConfig, output_dir: str | Path) -> dict:
    """Train as ``cfg`` says; everything goes to ``output_dir``. Returns the final summary."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(output_dir)))
    accelerator = engine.build_accelerator(cfg.distributed.deepspeed_config, cfg.distributed.mixed_precision, cfg.train.grad_accum,
                                           log_with=active_trackers(cfg.train.report_to), project_dir=output_dir)  # fmt: skip
    main = accelerator.is_main_process
    finished = False
    try:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        train_set, val_set = load_data(cfg, tokenizer, accelerator)
        if main:
            report_skipped(train_set, val_set)
            print(first_example(train_set, tokenizer, use_color()), flush=True)
        rows, collate_rows, lengths = training_rows(cfg, train_set, tokenizer.pad_token_id, main)
        check_batch_size(cfg, len(rows), accelerator.num_processes, main)
        cfg = steps_from_epochs(cfg, len(rows), accelerator.num_processes, main)
        labels = num_labels_of(cfg, train_set)
        model = load_model(
            cfg.model.path, cfg.model.task, torch_dtype(cfg.model.dtype), cfg.model.quantization,
            cfg.model.bnb_4bit_quant_type, cfg.model.bnb_4bit_double_quant, torch_dtype(cfg.model.bnb_4bit_compute_dtype),
            labels, cfg.model.trust_remote_code,
        )  # fmt: skip
        if cfg.data.packing and use_varlen_attention(model) and main:
            print("packing: attention runs example by example (sora_varlen: SDPA per packed example)", flush=True)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(cfg.train.seed)
        inject_sora(model, sora_config_for(cfg, model), verbose=main)
        collate = functools.partial(pad_collate, pad_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
        evaluate = None
        if val_set is not None:
            evaluate = make_evaluator(cfg.model.task, val_set, collate, cfg.data.eval_batch_size, accelerator,
                                      tokenizer, labels or 2, cfg.data.eval_generate_tokens,
                                      cfg.train.loss_chunk_tokens)
        cfg = resolve(cfg, model, main)
        # Trackers write into output_dir, so they start once nothing of the start-up can fail any
        # more (a refused run leaves its folder as it was); packages and network were checked at load.
        start_trackers(accelerator, cfg.train.tracker_project, Path(output_dir).name, output_dir, cfg.to_dict())
        if main:
            write_text(Path(output_dir) / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        stages = None
        controller = budget_controller(cfg, model) if cfg.sparsity_budget is not None else None
        if cfg.sparsity_schedule is None:
            model, _ = train(model, rows, cfg.train, accelerator, collate_fn=collate_rows, evaluate=evaluate, lambdas=controller, lengths=lengths)
            if controller is not None and main:
                write_budget_plot(controller, output_dir)
        else:
            subset = train_set.select(range(min(cfg.sparsity_schedule.train_subset, len(train_set))))
            memorize = make_evaluator(cfg.model.task, subset, collate, cfg.data.eval_batch_size, accelerator,
                                      tokenizer, labels or 2, cfg.data.eval_generate_tokens,
                                      cfg.train.loss_chunk_tokens)
            model, stages = run_stages(model, rows, cfg.train, cfg.sparsity_schedule, accelerator, evaluate, memorize,
                                       output_dir, collate_fn=collate_rows, lengths=lengths)  # fmt: skip
        report = sparsity_report(accelerator.unwrap_model(model))
        summary = {"train_examples": len(train_set), "skipped_rows": train_set.skipped_count, "skipped": train_set.skipped,
                   "sparsity": report.to_dict()}  # fmt: skip
        if val_set is not None:
            summary.update(validation_examples=len(val_set), validation_skipped_rows=val_set.skipped_count, validation_skipped=val_set.skipped)
        if cfg.data.packing:
            summary["packed_rows"] = len(rows)
        if stages is not None:
            summary["stages"] = stages
        if controller is not None:
            summary["budget"] = controller.summary()
        if main:
            print(report.table(), flush=True)
            write_text(Path(output_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
            if controller is not None:
                print(f"budget mode: target {controller.target:g} {controller.unit}, reached {controller.last_count:g}; "
                      f"see budget.png", flush=True)  # fmt: skip
            if stages is None:
                print(f"adapter, sparsity.json, rank_heatmap.png and metrics.jsonl are in {output_dir}", flush=True)
            else:
                print(f"stages.csv, stages.json and stages.png are in {output_dir}; each stage's adapter and reports in "
                      f"{Path(output_dir) / 'stages'}", flush=True)  # fmt: skip
        finished = True
        return summary
    finally:
        engine.end_of_run(finished, accelerator)
