"""The table of malformed inputs for sora-train, sora-merge and sora-export.

Each :class:`Case` starts from a good run (a tiny Llama, 12 instruction rows, 2 steps) or a good
adapter and base, breaks one thing and says which error line must come back: exit code 2, one
``error: ...`` line naming the file, key, row or tensor, no traceback, and no file changed.
tests/test_bad_input.py runs every case in-process (and a few as real subprocesses);
benchmarks/bad_input_fuzz.py runs every case as a real subprocess and counts the outcomes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
import yaml
from helpers import REPO, WORDS
from safetensors.torch import load_file, save_file

DELETE = object()  # config value: remove the key

# --- the good inputs each case breaks ------------------------------------------------------------


def instruction_rows(n: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        words = [WORDS[int(i)] for i in torch.randint(0, 100, (8,), generator=g)]
        rows.append({"instruction": " ".join(words[:5]), "input": "", "output": " ".join(words[5:])})
    return rows


def classification_rows(n: int = 12) -> list[dict]:
    return [{"text": f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}", "label": ["neg", "pos"][i % 2]} for i in range(n)]


def chat_rows(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{WORDS[i]} {WORDS[i + 1]}"},
                          {"role": "assistant", "content": f"{WORDS[i + 2]} {WORDS[i + 3]}"}]} for i in range(n)]  # fmt: skip


def jsonl(rows: list) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def base_config(case_dir: Path, model: Path) -> dict:
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "sora": {"r": 4, "alpha": 8},
        "data": {"format": "instruction", "train_file": str(case_dir / "train.jsonl"), "max_length": 32, "num_proc": 1},
        "train": {"steps": 2, "micro_batch_size": 2, "lr": 1e-2, "log_every": 1, "output_dir": str(case_dir / "out")},
    }


def tree_hash(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file (and empty folder) under ``roots``."""
    found = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir() and not any(path.iterdir()):
                found[str(path)] = "empty folder"
    return found


# --- the cases ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    name: str
    category: str  # config | data | adapter | base
    message: str  # regex the one error line must match
    command: str = "train"  # train | merge | export
    config: dict = dataclasses.field(default_factory=dict)  # "section.key" -> value (DELETE removes it)
    sets: tuple[str, ...] = ()  # --set arguments
    text: str | bytes | None = None  # the whole run.yaml instead of the good one
    files: dict = dataclasses.field(default_factory=dict)  # name -> str | bytes written into the case folder
    prepare: Callable[[Path], None] | None = None  # anything else, on the case folder
    adapter: Callable | None = None  # (meta, tensors, folder) -> (meta, tensors) for merge/export
    base: Callable[[Path], None] | None = None  # breaks the copied base folder
    args: tuple[str, ...] = ()  # extra command-line arguments
    env: dict = dataclasses.field(default_factory=dict)
    subprocess_only: bool = False  # needs a process of its own (process group, environment)

    @property
    def id(self) -> str:
        return f"{self.command}-{self.name}"


def cfg(name, message, category="config", **config):
    """A config case: keys written section__key."""
    return Case(name, category, message, config={k.replace("__", "."): v for k, v in config.items()})


def data(name, message, content, fmt="instruction", file="train.jsonl", **config):
    settings = {"data.format": fmt, "data.train_file": "{dir}/" + file, **{k.replace("__", "."): v for k, v in config.items()}}
    if fmt == "classification":
        settings.setdefault("model.task", "sequence_classification")
    return Case(name, "data", message, config=settings, files={file: content})


def output_under_a_file(case_dir: Path) -> None:
    (case_dir / "plain_file").write_text("not a folder\n")


def finished_run(case_dir: Path) -> None:
    out = case_dir / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "config.yaml").write_text("model: {path: earlier}\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (out / "adapter" / "sora_config.json").write_text("{}\n")


LATIN1 = jsonl(instruction_rows(4)).encode() + b'{"instruction": "caf\xe9", "output": "w1"}\n'
TEXT_ROWS = jsonl([{"text": " ".join(WORDS[i : i + 6])} for i in range(12)])
CLS = classification_rows()

TRAIN_CASES: list[Case] = [
    # YAML and the file itself
    Case("yaml syntax error", "config", r"run\.yaml:\d+: invalid YAML", text="model: {path: [\n"),
    Case("tab indentation", "config", r"run\.yaml:\d+: invalid YAML", text="model:\n\tpath: x\n"),
    Case("top level is a list", "config", r"run\.yaml: the top level must be a mapping", text="- model\n- data\n"),
    Case("top level is a number", "config", r"run\.yaml: the top level must be a mapping", text="42\n"),
    Case("empty config file", "config", r"model\.path: required", text=""),
    Case("duplicate top-level key", "config", r"run\.yaml:\d+: invalid YAML: duplicate key 'train'", text="train: {steps: 1}\ntrain: {steps: 2}\n"),
    Case("duplicate nested key", "config", r"run\.yaml:\d+: invalid YAML: duplicate key 'lr'", text="train:\n  lr: 1.0e-3\n  lr: 1.0e-2\n"),
    Case("config not UTF-8", "config", r"run\.yaml: not UTF-8 text", text=b"model:\n  path: caf\xe9\n"),
    Case("config is a folder", "config", r"run\.yaml: config file not found", prepare=lambda d: ((d / "run.yaml").unlink(), (d / "run.yaml").mkdir())),
    Case("--set value not YAML", "config", r"--set train\.lr: invalid YAML value '\['", sets=("train.lr=[",)),
    Case("--set without =", "config", r"--set 'train\.lr': expected section\.key=value", sets=("train.lr",)),
    Case("--set without section", "config", r"--set 'lr=1': expected section\.key=value", sets=("lr=1",)),
    Case("--set unknown section", "config", r"--set trian\.lr: unknown section 'trian'", sets=("trian.lr=1",)),
    Case("--set unknown key", "config", r"train\.learning_rate: unknown key", sets=("train.learning_rate=1",)),
    cfg("unknown section", r"trainer: unknown section", trainer={"lr": 1}),
    cfg("section not a mapping", r"train: expected a mapping", train=5),
    cfg("unknown model key", r"model\.name: unknown key", model__name="x"),
    cfg("unknown sora key", r"sora\.rank: unknown key", sora__rank=4),
    cfg("unknown data key", r"data\.file: unknown key", data__file="x"),
    cfg("unknown distributed key", r"distributed\.zero: unknown key", distributed__zero=2),
    # model
    cfg("model path missing", r"model\.path: required", model__path=DELETE),
    cfg("model path does not exist", r"model\.path.*does/not/exist", model__path="/does/not/exist"),
    cfg("model dtype unknown", r"model\.dtype: must be one of", model__dtype="float8"),
    cfg("model task unknown", r"model\.task: must be one of", model__task="seq2seq"),
    cfg("quantization unknown", r"model\.quantization: must be one of", model__quantization="3bit"),
    cfg("bnb quant type unknown", r"model\.bnb_4bit_quant_type: must be one of", model__bnb_4bit_quant_type="int4"),
    cfg("num_labels zero", r"model\.num_labels: must be >= 1", model__num_labels=0),
    cfg("num_labels text", r"model\.num_labels: expected int", model__num_labels="two"),
    cfg("trust_remote_code text", r"model\.trust_remote_code: expected bool", model__trust_remote_code="yes please"),
    # sora
    cfg("r zero", r"sora\.r: ", sora__r=0),
    cfg("r negative", r"sora\.r: ", sora__r=-4),
    cfg("r float", r"sora\.r: expected int", sora__r=1.5),
    cfg("r text", r"sora\.r: expected int", sora__r="four"),
    cfg("r 1e9", r"sora\.r", sora__r=10**9),
    cfg("r above the layer width", r"sora\.r", sora__r=100),
    cfg("alpha NaN", r"sora\.alpha", sora__alpha=float("nan")),
    cfg("alpha inf", r"sora\.alpha", sora__alpha=float("inf")),
    cfg("alpha zero", r"sora\.alpha", sora__alpha=0),
    cfg("dropout above 1", r"sora\.dropout", sora__dropout=1.5),
    cfg("dropout negative", r"sora\.dropout", sora__dropout=-0.1),
    cfg("target regex invalid", r"sora\.target_modules: '\[' is not a valid regular expression", sora__target_modules="["),
    cfg("target list empty", r"sora\.target_modules", sora__target_modules=[]),
    cfg("target matches nothing", r"sora\.target_modules.*no_such_proj", sora__target_modules=["no_such_proj"]),
    cfg("target list of numbers", r"sora\.target_modules: expected", sora__target_modules=[1, 2]),
    cfg("gate_init unknown", r"sora\.gate_init: must be one of", sora__gate_init="zeros"),
    cfg("adapter dtype unknown", r"sora\.adapter_dtype", sora__adapter_dtype="float128"),
    cfg("modules_to_save text", r"sora\.modules_to_save: expected", sora__modules_to_save=5),
    cfg("modules_to_save matches nothing", r"sora\.modules_to_save.*lm_tail", sora__modules_to_save=["lm_tail"]),
    # train
    cfg("steps zero", r"train\.steps", train__steps=0),
    cfg("steps negative", r"train\.steps", train__steps=-1),
    cfg("steps float", r"train\.steps: expected int", train__steps=2.5),
    cfg("steps 1e12", r"train\.steps", train__steps=10**12),
    Case("steps 1e12 in budget mode", "config", r"train\.steps", config={"train.steps": 10**12, "sparsity_budget": {"target_rank": 2, "by_step": 1}}),
    cfg("micro_batch_size zero", r"train\.micro_batch_size", train__micro_batch_size=0),
    cfg("micro_batch_size 1e9", r"train\.micro_batch_size", train__micro_batch_size=10**9),
    cfg("grad_accum zero", r"train\.grad_accum", train__grad_accum=0),
    cfg("grad_accum 1e9", r"train\.grad_accum", train__grad_accum=10**9),
    cfg("lr NaN", r"train\.lr", train__lr=float("nan")),
    cfg("lr inf", r"train\.lr", train__lr=float("inf")),
    cfg("lr negative", r"train\.lr", train__lr=-1e-3),
    cfg("lr 1e300", r"train\.lr: must be a finite number in \[0, 3\.40e\+38\]", train__lr=1e300),
    cfg("lr text", r"train\.lr: expected float", train__lr="fast"),
    cfg("gate_lr NaN", r"train\.gate_lr", train__gate_lr=float("nan")),
    cfg("gate_lr negative", r"train\.gate_lr", train__gate_lr=-1.0),
    cfg("weight_decay negative", r"train\.weight_decay", train__weight_decay=-1),
    cfg("weight_decay NaN", r"train\.weight_decay", train__weight_decay=float("nan")),
    cfg("max_grad_norm negative", r"train\.max_grad_norm", train__max_grad_norm=-1),
    cfg("max_grad_norm inf", r"train\.max_grad_norm", train__max_grad_norm=float("inf")),
    cfg("warmup negative", r"train\.warmup_steps", train__warmup_steps=-1),
    cfg("warmup longer than training", r"train\.warmup_steps", train__warmup_steps=5),
    cfg("lr_decay unknown", r"train\.lr_decay: must be one of", train__lr_decay="step"),
    cfg("optimizer unknown", r"train\.optimizer", train__optimizer="lion"),
    cfg("report_to unknown tracker", r"train\.report_to: unknown tracker 'neptune'", train__report_to=["tensorboard", "neptune"]),
    cfg("report_to none with a tracker", r"train\.report_to: 'none' cannot be combined", train__report_to=["none", "wandb"]),
    cfg("report_to a number", r"train\.report_to: expected", train__report_to=3),
    cfg("gate_update unknown", r"train\.gate_update: must be one of", train__gate_update="adam"),
    cfg("threshold unknown", r"train\.threshold: must be one of", train__threshold="soft"),
    cfg("lambda_kind unknown", r"train\.lambda_kind: must be one of", train__lambda_kind="cubic"),
    cfg("lambda_start NaN", r"train\.lambda_start", train__lambda_start=float("nan")),
    cfg("lambda_start negative", r"train\.lambda_start", train__lambda_start=-1),
    cfg("lambda_end NaN", r"train\.lambda", train__lambda_kind="linear", train__lambda_start=0.5, train__lambda_end=float("nan"), train__lambda_steps=2),
    cfg("seed text", r"train\.seed: expected int", train__seed="abc"),
    cfg("epochs negative", r"train\.epochs", train__epochs=-1, train__steps=DELETE),
    cfg("epochs NaN", r"train\.epochs", train__epochs=float("nan"), train__steps=DELETE),
    cfg("epochs and steps", r"train\.epochs: give train\.steps or train\.epochs, not both", train__epochs=1),
    cfg("save_every negative", r"train\.save_every", train__save_every=-1),
    cfg("keep_checkpoints zero", r"train\.keep_checkpoints", train__keep_checkpoints=0),
    cfg("log_every negative", r"train\.log_every", train__log_every=-1),
    cfg("eval_every negative", r"train\.eval_every", train__eval_every=-2),
    Case("output_dir under a regular file", "config", r"train\.output_dir.*plain_file", config={"train.output_dir": "{dir}/plain_file/out"}, prepare=output_under_a_file),
    Case("output_dir is a regular file", "config", r"train\.output_dir.*plain_file", config={"train.output_dir": "{dir}/plain_file"}, prepare=output_under_a_file),
    Case("start-up failure next to a finished run", "config", r"sora\.target_modules", config={"sora.target_modules": ["no_such_proj"]}, prepare=finished_run),
    Case("model missing next to a finished run", "config", r"model\.path", config={"model.path": "{dir}/no_model"}, prepare=finished_run),
    # data section values
    cfg("data format unknown", r"data\.format: must be one of", data__format="alpaca"),
    cfg("train_file missing", r"data\.train_file", data__train_file=DELETE),
    cfg("train_file does not exist", r"data\.train_file.*nowhere\.jsonl", data__train_file="/nowhere.jsonl"),
    Case("train_file unsupported type", "config", r"data\.train_file.*unsupported file type '\.docx'", config={"data.train_file": "{dir}/run.docx"}, files={"run.docx": "w1"}),
    cfg("max_length zero", r"data\.max_length", data__max_length=0),
    cfg("max_length negative", r"data\.max_length", data__max_length=-8),
    cfg("validation_fraction 1.5", r"data\.validation_fraction", data__validation_fraction=1.5),
    cfg("validation_fraction negative", r"data\.validation_fraction", data__validation_fraction=-0.1),
    cfg("validation_file missing", r"data\.validation_file.*nowhere\.jsonl", data__validation_file="/nowhere.jsonl"),
    cfg("eval_batch_size zero", r"data\.eval_batch_size", data__eval_batch_size=0, data__validation_fraction=0.25),
    cfg("eval_max_examples negative", r"data\.eval_max_examples", data__eval_max_examples=-1),
    cfg("eval_generate_tokens negative", r"data\.eval_generate_tokens", data__eval_generate_tokens=-1),
    cfg("on_error unknown", r"data\.on_error: must be one of", data__on_error="ignore"),
    cfg("columns not a mapping", r"data\.columns: expected", data__columns=["text"]),
    cfg("columns name a missing column", r"data\.columns names 'prompt'", data__columns={"instruction": "prompt"}),
    cfg("train_weights wrong length", r"data\.train_weights", data__train_weights=[0.5, 0.5]),
    cfg("train_weights negative", r"data\.train_weights", data__train_weights=[-1.0]),
    cfg("num_proc negative", r"data\.num_proc", data__num_proc=-1),
    cfg("packing a classifier", r"data\.packing", data__packing=True, model__task="sequence_classification", data__format="classification"),
    # distributed, schedules and budgets
    cfg("deepspeed config missing", r"distributed\.deepspeed_config: file '/nowhere\.json' not found", distributed__deepspeed_config="/nowhere.json"),
    Case("deepspeed config not JSON", "config", r"ds\.json.*(invalid JSON|not JSON)", config={"distributed.deepspeed_config": "{dir}/ds.json"}, files={"ds.json": "{zero: 2"}),
    Case("deepspeed config a list", "config", r"ds\.json: a DeepSpeed config is a JSON object", config={"distributed.deepspeed_config": "{dir}/ds.json"}, files={"ds.json": "[1, 2]"}),
    cfg("mixed_precision unknown", r"distributed\.mixed_precision: must be one of", distributed__mixed_precision="fp8"),
    cfg("schedule kind unknown", r"sparsity_schedule\.kind", sparsity_schedule={"kind": "cosine"}),
    cfg("schedule without validation data", r"sparsity_schedule: the generalization curve needs validation data", sparsity_schedule={"kind": "linear", "start": 0.1, "end": 1, "stages": 2}),
    cfg("schedule values decreasing", r"sparsity_schedule\.values", sparsity_schedule={"kind": "list", "values": [1.0, 0.5]}, data__validation_fraction=0.25),
    cfg("schedule zero stages", r"sparsity_schedule\.stages", sparsity_schedule={"kind": "linear", "start": 0.1, "end": 1, "stages": 0}, data__validation_fraction=0.25),
    cfg("budget target above r", r"sparsity_budget\.target_rank: must be <= sora\.r", sparsity_budget={"target_rank": 9, "by_step": 1}),
    cfg("budget by_step past steps", r"sparsity_budget\.by_step: must be <= train\.steps", sparsity_budget={"target_rank": 2, "by_step": 9}),
    cfg("budget and schedule", r"sparsity_budget: cannot be combined", sparsity_budget={"target_rank": 2, "by_step": 1},
        sparsity_schedule={"kind": "list", "values": [0.1]}, data__validation_fraction=0.25),  # fmt: skip
    cfg("budget target NaN", r"sparsity_budget\.target_rank", sparsity_budget={"target_rank": float("nan"), "by_step": 1}),
    # data files
    data("JSONL invalid line", r"train\.jsonl:3: ", jsonl(instruction_rows(2)) + "{not json\n"),
    data("JSONL latin-1 byte", r"train\.jsonl:5: not UTF-8", LATIN1),
    data("JSONL empty file", r"train\.jsonl.*(empty|no rows|no usable rows)", ""),
    data("JSONL blank lines only", r"train\.jsonl.*(empty|no rows|no usable rows)", "\n\n\n"),
    data("JSONL row is a list", r"train\.jsonl:1: each line must be a JSON object", "[1, 2]\n" + jsonl(instruction_rows(2))),
    data("JSONL truncated last line", r"train\.jsonl:3: ", jsonl(instruction_rows(2)) + '{"instruction": "w1", "out'),
    data("instruction missing", r"train\.jsonl.*row 1: missing field 'instruction'", jsonl([{"output": "w1"}] + instruction_rows(2))),
    data("output missing", r"train\.jsonl.*row 1: missing field 'output'", jsonl([{"instruction": "w1"}] + instruction_rows(2))),
    data("output is a number", r"train\.jsonl.*row 1: field 'output' must be text, got int", jsonl([{"instruction": "w1", "output": 7}] + instruction_rows(2))),
    data("output is null", r"train\.jsonl.*row 1: missing field 'output'", jsonl([{"instruction": "w1", "output": None}] + instruction_rows(2))),
    data("instruction is a dict", r"train\.jsonl.*row 1: field 'instruction' must be text", jsonl([{"instruction": {"a": 1}, "output": "w1"}] + instruction_rows(2))),
    data("answers truncated away", r"train\.jsonl.*row 1: no labelled token left after truncation to max_length=8",
         jsonl([{"instruction": " ".join(WORDS[:12]), "output": "w1 w2"}] * 3), data__max_length=8),
    data("text column missing", r"train\.jsonl.*the 'text' format needs the column\(s\) text", jsonl([{"body": "w1"}]), fmt="text"),
    data("text null", r"train\.jsonl:row 2: missing field 'text'", jsonl([{"text": "w1"}, {"text": None}]), fmt="text"),
    data("text is a list", r"train\.jsonl.*row 1: field 'text' must be text", jsonl([{"text": ["w1"]}]), fmt="text"),
    data("chat messages not a list", r"train\.jsonl.*row 1.*messages", jsonl([{"messages": "hello"}] + chat_rows(2)), fmt="chat"),
    data("chat role robot", r"train\.jsonl.*row 1.*robot", jsonl([{"messages": [{"role": "robot", "content": "w1"}, {"role": "assistant", "content": "w2"}]}]), fmt="chat"),
    data("chat content null", r"train\.jsonl.*row 1.*content", jsonl([{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "w2"}]}]), fmt="chat"),
    data("chat content int", r"train\.jsonl.*row 1.*content", jsonl([{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "w2"}]}]), fmt="chat"),
    data("chat no assistant turn", r"train\.jsonl.*row 1.*assistant", jsonl([{"messages": [{"role": "user", "content": "w1"}]}]), fmt="chat"),
    data("chat messages empty", r"train\.jsonl.*row 1.*messages", jsonl([{"messages": []}] + chat_rows(2)), fmt="chat"),
    data("chat turn without role", r"train\.jsonl.*row 1.*role", jsonl([{"messages": [{"content": "w1"}, {"role": "assistant", "content": "w2"}]}]), fmt="chat"),
    data("sharegpt unknown from", r"train\.jsonl.*row 1.*robot", jsonl([{"conversations": [{"from": "robot", "value": "w1"}, {"from": "gpt", "value": "w2"}]}]), fmt="chat"),
    data("label 5 of 2 classes", r"train\.jsonl.*row 1: label 5 is out of range for 2 classes", jsonl([{"text": "w1", "label": 5}] + [{"text": "w2", "label": i % 2} for i in range(3)]), fmt="classification", model__num_labels=2),
    data("label -1 of 2 classes", r"train\.jsonl.*row 1: label -1 is out of range for 2 classes", jsonl([{"text": "w1", "label": -1}] + [{"text": "w2", "label": i % 2} for i in range(3)]), fmt="classification", model__num_labels=2),
    data("label name count above num_labels", r"model\.num_labels.*3.*(labels|classes)", jsonl([{"text": "w1", "label": n} for n in ("a", "b", "c")]), fmt="classification", model__num_labels=2),
    data("label bool", r"train\.jsonl.*row 1: field 'label'", jsonl([{"text": "w1", "label": True}, {"text": "w2", "label": False}]), fmt="classification"),
    data("label null", r"train\.jsonl.*row 1: field 'label'", jsonl([{"text": "w1", "label": None}] + CLS[:2]), fmt="classification"),
    data("label missing", r"train\.jsonl.*row 1: field 'label'", jsonl([{"text": "w1"}] + CLS[:2]), fmt="classification"),
    data("labels mixed types", r"train\.jsonl.*label", jsonl([{"text": "w1", "label": "pos"}, {"text": "w2", "label": 1}, {"text": "w3", "label": "neg"}]), fmt="classification"),
    data("num_labels 1 with class names", r"model\.num_labels.*1.*regression", jsonl(CLS), fmt="classification", model__num_labels=1),
    data("float labels without num_labels", r"model\.num_labels.*regression", jsonl([{"text": "w1", "label": 0.5}, {"text": "w2", "label": 1.5}]), fmt="classification"),
    data("text_pair int", r"train\.jsonl.*row 1: field 'text_pair' must be text", jsonl([{"text": "w1", "text_pair": 3, "label": "pos"}] + CLS[:2]), fmt="classification"),
    data("classifier text missing", r"train\.jsonl.*row 1: missing field 'text'", jsonl([{"label": "pos"}] + CLS[:2]), fmt="classification"),
    data("CSV missing column", r"train\.csv.*output", "instruction,answer\nw1,w2\n", file="train.csv"),
    data("CSV empty", r"train\.csv.*(empty|no rows|no usable rows|column)", "", file="train.csv"),
    data("parquet corrupt", r"train\.parquet: cannot be read", b"PAR1 this is not parquet", file="train.parquet"),
    data("unsupported extension", r"unsupported file type '\.txt'", "w1 w2\n", file="train.txt"),
    data("blocks file without text", r"train\.jsonl:1: ", jsonl([{"body": "w1"}]), fmt="blocks"),
    data("blocks invalid JSON", r"train\.jsonl:2: invalid JSON", jsonl([{"text": "w1"}]) + "{oops\n", fmt="blocks"),
    Case("validation file with a bad row", "data", r"valid\.jsonl.*row 2: missing field 'output'",
         config={"data.validation_file": "{dir}/valid.jsonl"}, files={"valid.jsonl": jsonl(instruction_rows(1) + [{"instruction": "w1"}])}),  # fmt: skip
    Case("validation file latin-1", "data", r"valid\.jsonl:5: not UTF-8", config={"data.validation_file": "{dir}/valid.jsonl"}, files={"valid.jsonl": LATIN1}),
    Case("validation labels unseen in training", "data", r"valid\.jsonl.*row 1: unknown label 'maybe'",
         config={"model.task": "sequence_classification", "data.format": "classification", "data.train_file": "{dir}/train.jsonl",
                 "data.validation_file": "{dir}/valid.jsonl"},
         files={"train.jsonl": jsonl(CLS), "valid.jsonl": jsonl([{"text": "w1", "label": "maybe"}])}),  # fmt: skip
    Case("second source broken", "data", r"extra\.jsonl.*row 1: missing field 'output'",
         config={"data.train_file": ["{dir}/train.jsonl", "{dir}/extra.jsonl"]}, files={"extra.jsonl": jsonl([{"instruction": "w1", "output": None}])}),  # fmt: skip
    Case("ACCELERATE_USE_CPU with a DeepSpeed config", "config", r"ACCELERATE_USE_CPU=true .* turns DeepSpeed off",
         env={"ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "ds_configs" / "zero2.json")},
         subprocess_only=True),  # fmt: skip
    # model files
    Case("model safetensors truncated", "base", r"model\.safetensors.*cannot be read", config={"model.path": "{dir}/model"}, prepare=lambda d: truncate_model(d)),
    Case("model config.json not JSON", "base", r"config\.json", config={"model.path": "{dir}/model"}, prepare=lambda d: copy_model(d, lambda m: (m / "config.json").write_text("{oops"))),
    Case("model folder without weights", "base", r"model.*(no (model )?weights|safetensors|pytorch_model)", config={"model.path": "{dir}/model"},
         prepare=lambda d: copy_model(d, lambda m: (m / "model.safetensors").unlink())),  # fmt: skip
    Case("model folder without tokenizer", "base", r"model.*tokenizer", config={"model.path": "{dir}/model"},
         prepare=lambda d: copy_model(d, lambda m: [p.unlink() for p in m.glob("tokenizer*")])),  # fmt: skip
]

MODEL_DIR: Path | None = None  # set by the runner: the good tiny model folder


def copy_model(case_dir: Path, change: Callable[[Path], object]) -> None:
    shutil.copytree(MODEL_DIR, case_dir / "model")
    change(case_dir / "model")


def truncate_model(case_dir: Path) -> None:
    def cut(folder: Path) -> None:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])

    copy_model(case_dir, cut)


# --- adapters and bases -------------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj"


def _truncated(meta, tensors, folder):
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return meta, None


def _write(name: str, content: bytes):
    def change(meta, tensors, folder):
        (folder / name).write_bytes(content)
        return (meta, None) if name.endswith(".safetensors") else (None, tensors)

    return change


def _module(meta, **spec):
    return {**meta, "modules": {**meta["modules"], Q: {**meta["modules"][Q], **spec}}}


def _without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


ADAPTER_CHANGES: dict[str, tuple[Callable, str]] = {
    "config is a list": (lambda m, t, f: ([m], t), r"sora_config\.json: not a sora_dist adapter config"),
    "config is a number": (lambda m, t, f: (7, t), r"sora_config\.json: not a sora_dist adapter config"),
    "config lacks modules": (lambda m, t, f: (_without(m, "modules"), t), r"sora_config\.json: 'modules' must be a dict"),
    "config lacks base_model": (lambda m, t, f: (_without(m, "base_model"), t), r"'base_model' must be a dict"),
    "config lacks format": (lambda m, t, f: (_without(m, "format"), t), r"sora_config\.json"),
    "config from a newer format": (lambda m, t, f: ({**m, "format_version": 99}, t), r"sora_config\.json.*(version|format)"),
    "modules is a list": (lambda m, t, f: ({**m, "modules": [Q]}, t), r"'modules' must be a dict"),
    "module spec without rank": (lambda m, t, f: ({**m, "modules": {**m["modules"], Q: {"in_features": 64}}}, t), rf"modules\.{Q} must give the numbers"),
    "module rank is text": (lambda m, t, f: (_module(m, rank="four"), t), rf"modules\.{Q}"),
    "module rank negative": (lambda m, t, f: (_module(m, rank=-1), t), rf"modules\.{Q}"),
    "module scale NaN": (lambda m, t, f: (_module(m, scale=float("nan")), t), rf"modules\.{Q}\.scale must be a finite number"),
    "module not in the base": (lambda m, t, f: ({**m, "modules": {**m["modules"], "model.layers.9.mlp.up_proj": m["modules"][Q]}},
                                                {**t, **{k.replace(Q, "model.layers.9.mlp.up_proj"): v.clone() for k, v in t.items() if k.startswith(Q)}}),
                               r"model\.layers\.9\.mlp\.up_proj"),  # fmt: skip
    "config not JSON": (lambda m, t, f: ("{not json", t), r"sora_config\.json:1: invalid JSON"),
    "config empty": (lambda m, t, f: ("", t), r"sora_config\.json:1: invalid JSON"),
    "config not UTF-8": (_write("sora_config.json", b'{"format": "caf\xe9"}'), r"sora_config\.json"),
    "gate tensor missing": (lambda m, t, f: (m, _without(t, f"{Q}.gate")), rf"tensor '{Q}\.gate' is missing"),
    "lora_A missing": (lambda m, t, f: (m, _without(t, f"{Q}.lora_A")), rf"tensor '{Q}\.lora_A' is missing"),
    "lora_A transposed": (lambda m, t, f: (m, {**t, f"{Q}.lora_A": t[f"{Q}.lora_A"].t().contiguous()}), rf"tensor '{Q}\.lora_A' has shape \[64, 4\], expected \[4, 64\]"),
    "lora_B wrong width": (lambda m, t, f: (m, {**t, f"{Q}.lora_B": t[f"{Q}.lora_B"][:, :2].contiguous()}), rf"tensor '{Q}\.lora_B' has shape"),
    "gate wrong length": (lambda m, t, f: (m, {**t, f"{Q}.gate": t[f"{Q}.gate"][:3].contiguous()}), rf"tensor '{Q}\.gate' has shape"),
    "NaN in lora_B": (lambda m, t, f: (m, {**t, f"{Q}.lora_B": torch.full_like(t[f"{Q}.lora_B"], float("nan"))}), rf"tensor '{Q}\.lora_B' holds NaN or inf"),
    "inf in the gate": (lambda m, t, f: (m, {**t, f"{Q}.gate": torch.full_like(t[f"{Q}.gate"], float("inf"))}), rf"tensor '{Q}\.gate' holds NaN or inf"),
    "integer lora_A": (lambda m, t, f: (m, {**t, f"{Q}.lora_A": t[f"{Q}.lora_A"].to(torch.int32)}), rf"tensor '{Q}\.lora_A'.*(dtype|floating)"),
    "truncated safetensors": (_truncated, r"adapter_model\.safetensors: cannot be read as safetensors"),
    "empty safetensors file": (_write("adapter_model.safetensors", b""), r"adapter_model\.safetensors: cannot be read as safetensors"),
    "safetensors header garbage": (_write("adapter_model.safetensors", (8).to_bytes(8, "little") + b"{garbage"), r"adapter_model\.safetensors: cannot be read as safetensors"),
    "safetensors file missing": (lambda m, t, f: (m, None), r"adapter_model\.safetensors"),
    "sora_config.json missing": (lambda m, t, f: (None, t), r"sora_config\.json"),
}

BASE_CHANGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "base truncated": (lambda b: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:5000]), r"model\.safetensors: cannot be read as safetensors"),
    "base without weights": (lambda b: (b / "model.safetensors").unlink(), r"base: no model\.safetensors or model\.safetensors\.index\.json"),
    "base config.json not JSON": (lambda b: (b / "config.json").write_text("{oops"), r"base/config\.json: invalid model config"),
    "base narrower than the adapter": (lambda b: narrow_base(b), rf"module '{Q}' is stored as 64x64 in the adapter's base but {Q}\.weight is 64x32"),
    "base missing a target": (lambda b: drop_base_tensor(b, f"{Q}.weight"), rf"{Q}"),
    "base NaN in a target": (lambda b: nan_base_tensor(b, f"{Q}.weight"), rf"base tensor '{Q}\.weight' holds NaN or inf"),
}


def _base_tensors(folder: Path, change: Callable[[dict], dict]) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file(change(tensors), str(path), metadata={"format": "pt"})


def narrow_base(folder: Path) -> None:
    _base_tensors(folder, lambda t: {**t, f"{Q}.weight": t[f"{Q}.weight"][:, :32].contiguous()})


def drop_base_tensor(folder: Path, key: str) -> None:
    _base_tensors(folder, lambda t: _without(t, key))


def nan_base_tensor(folder: Path, key: str) -> None:
    _base_tensors(folder, lambda t: {**t, key: torch.full_like(t[key], float("nan"))})


def deploy_cases() -> list[Case]:
    cases = []
    for command in ("merge", "export"):
        for name, (change, message) in ADAPTER_CHANGES.items():
            if command == "export" and name == "module not in the base":
                continue  # export reads no base
            cases.append(Case(name, "adapter", message, command=command, adapter=change))
    for name, (change, message) in BASE_CHANGES.items():
        cases.append(Case(name, "base", message, command="merge", base=change))
    cases += [
        Case("adapter folder missing", "adapter", r"--adapter .*nowhere", command="merge", args=("--adapter", "{dir}/nowhere")),
        Case("adapter folder empty", "adapter", r"empty.*(sora_config\.json|adapter)", command="export", args=("--adapter", "{dir}/empty"),
             prepare=lambda d: (d / "empty").mkdir()),  # fmt: skip
        Case("base folder missing", "base", r"--base .*nowhere", command="merge", args=("--base", "{dir}/nowhere")),
        Case("out is the adapter", "adapter", r"--out .* overlaps --adapter", command="merge", args=("--out", "{dir}/adapter", "--force")),
        Case("out inside the adapter", "adapter", r"--out .* overlaps --adapter", command="export", args=("--out", "{dir}/adapter/peft", "--force")),
        Case("out is the base", "base", r"--out .* overlaps --base", command="merge", args=("--out", "{dir}/base", "--force")),
        Case("out holds the inputs", "adapter", r"--out .* overlaps", command="merge", args=("--out", "{dir}", "--force")),
        Case("out exists without --force", "adapter", r"--out|exists", command="export", prepare=lambda d: (d / "out").mkdir()),
        Case("out under a regular file", "adapter", r"--out .*plain_file/merged: cannot create it: .*plain_file is a file", command="merge", args=("--out", "{dir}/plain_file/merged"), prepare=output_under_a_file),
        Case("dtype unknown", "adapter", r"--dtype: invalid choice", command="merge", args=("--dtype", "fp8")),
        Case("format unknown", "adapter", r"--format: invalid choice", command="export", args=("--format", "gguf")),
    ]
    return cases


ALL_CASES: list[Case] = TRAIN_CASES + deploy_cases()


# --- building a case's folder and running it ------------------------------------------------------


def fill(value, case_dir: Path):
    if isinstance(value, str):
        return value.replace("{dir}", str(case_dir))
    if isinstance(value, list):
        return [fill(v, case_dir) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, case_dir) for k, v in value.items()}
    return value


def build(case: Case, case_dir: Path, model: Path, adapter: Path | None = None) -> list[str]:
    """Write the case's folder; returns the command's arguments."""
    global MODEL_DIR
    MODEL_DIR = model
    case_dir.mkdir(parents=True, exist_ok=True)
    if case.command == "train":
        (case_dir / "train.jsonl").write_text(jsonl(instruction_rows()))
        raw = base_config(case_dir, model)
        for key, value in case.config.items():
            section, _, field = key.partition(".")
            if not field:
                raw[section] = fill(value, case_dir)
            elif value is DELETE:
                raw.get(section, {}).pop(field, None)
            else:
                raw.setdefault(section, {})[field] = fill(value, case_dir)
        text = case.text if case.text is not None else yaml.safe_dump(raw)
        (case_dir / "run.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    for name, content in case.files.items():
        (case_dir / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.command == "train":
        if case.prepare:
            case.prepare(case_dir)
        return [str(case_dir / "run.yaml"), *[x for s in case.sets for x in ("--set", fill(s, case_dir))], *[fill(a, case_dir) for a in case.args]]
    shutil.copytree(model, case_dir / "base")
    shutil.copytree(adapter, case_dir / "adapter")
    if case.adapter is not None:
        meta = json.loads((adapter / "sora_config.json").read_text())
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        for name in ("sora_config.json", "adapter_model.safetensors"):
            (case_dir / "adapter" / name).unlink()
        meta, tensors = case.adapter(meta, tensors, case_dir / "adapter")
        if meta is not None:
            text = meta if isinstance(meta, str) else json.dumps(meta)
            (case_dir / "adapter" / "sora_config.json").write_text(text)
        if tensors is not None:
            save_file(tensors, str(case_dir / "adapter" / "adapter_model.safetensors"))
    if case.base is not None:
        case.base(case_dir / "base")
    if case.prepare:
        case.prepare(case_dir)
    args = {"--adapter": str(case_dir / "adapter"), "--out": str(case_dir / "out")}
    if case.command == "merge":
        args = {"--base": str(case_dir / "base"), **args}
    extra = [fill(a, case_dir) for a in case.args]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[flag] = value
    rest = [a for i, a in enumerate(extra) if not (i % 2 == 0 and a in args) and not (i % 2 == 1 and extra[i - 1] in args)]
    return [x for pair in args.items() for x in pair] + rest


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ") or ": error: " in line]


def judge(case: Case, code: int | None, stderr: str, before: dict, after: dict) -> str:
    """clear | traceback | silent | hang | overwrite | unclear (an error line that names nothing)."""
    if code is None:
        return "hang"
    if code == 0:
        return "silent"
    if before != after:
        return "overwrite"
    if "Traceback" in stderr:
        return "traceback"
    lines = error_lines(stderr)
    if code != 2 or len(lines) != 1 or not re.search(case.message, lines[0]):
        return "unclear"
    return "clear"


def run_subprocess(case: Case, argv: list[str], timeout: float = 120) -> tuple[int | None, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", **case.env)
    cmd = [sys.executable, "-m", "sora_dist.cli", case.command, *argv]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return None, (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    return proc.returncode, proc.stderr
