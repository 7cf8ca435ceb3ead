"""E1, the paper's regime: small training sets trained for many epochs, model selection on validation.

The tasks, encoders, data subsets and evaluation of ``benchmarks/quality.py``, with a different
regime: ``train`` examples (500 in --quick) seen for ``epochs`` epochs (10), validation accuracy
after every epoch, and the test accuracy read both at the best validation epoch and at the last.
Each arm's learning rate is chosen on validation (mean over seeds of the best validation accuracy)
from the same small grid (``--lrs``). Arms:

``lora``           PEFT LoRA r=8 (r_max), AdamW, no decay;
``lora_r5``        PEFT LoRA r=5 everywhere: about the size SoRA's budget keeps (uniform allocation);
``gated``          SoRA's gated adapter with nothing pruned (λ = 0, gate lr = lr);
``sora_authors``   the authors' regime (examples/authors_regime.yaml): gate lr = lr, Adam step then a
                   fixed threshold ξ = 3e-4, the L1 term gate_l1 = 10, weight decay 0.1 on A and B,
                   clipping 0.1, 6% warm-up;
``sora_budget``    budget mode to an average rank of 5 (our default allocation: keeps the largest |g|);
``sora_balanced``  the same budget with ``normalize_factors``: each rank's scale moved into its gate
                   after every step, so budget mode keeps the largest contributions;
``adalora``        PEFT AdaLoRA from r=8 to an average of 5.

    python benchmarks/regime.py --quick        # rotten_tomatoes, 400 examples x 10 epochs, 3 seeds, 2 lrs, 6 arms (no AdaLoRA)
    python benchmarks/regime.py --full         # 3 tasks, 5 seeds, 3 learning rates (not run here: ~20 h on 2 CPU cores)

Results go to ``runs/regime/<mode>-<settings hash>/results.jsonl`` (one line per run; a rerun skips
the runs already there, so an interrupted benchmark continues) and ``table.md`` (printed too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
from quality import TASKS, Settings, adapter_targets, collate, evaluate, head_names, length_grouped_batches  # noqa: E402

from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_param_groups, sparsity_report  # noqa: E402
from sora_dist.core.optim import scale_learning_rates  # noqa: E402
from sora_dist.training.config import TrainConfig  # noqa: E402
from sora_dist.training.lr import lr_factor  # noqa: E402

ARMS = ("lora", "lora_r5", "gated", "sora_authors", "sora_budget", "sora_balanced", "adalora")


@dataclasses.dataclass(frozen=True)
class Arm:
    clip: float = 1.0
    warmup: float = 0.1


class Gated(quality.Method):
    """SoRA's adapter with the optimizer settings of one arm (no budget)."""

    def __init__(self, model, settings: Settings, **groups):
        inject_sora(model, SoRAConfig(r=settings.r_max, alpha=settings.alpha, target_modules=adapter_targets(model, settings),
                                      modules_to_save=head_names(model)), verbose=False)  # fmt: skip
        super().__init__(model, SoRAOptimizer(sora_param_groups(model, lr=settings.lr, gate_lr=settings.lr, **groups), lr=settings.lr, eps=1e-6))

    def adapter_params(self) -> tuple[int, int]:
        trainable = sum(p.numel() for n, p in self.model.named_parameters() if n.endswith(("lora_A", "lora_B", "gate")))
        return trainable, sparsity_report(self.model).params

    def extra(self) -> dict:
        return {"live_ranks": sparsity_report(self.model).live_rank}


class Balanced(quality.SoRA):
    """Budget mode with the scale moved into the gates after every step."""

    def __init__(self, model, settings: Settings):
        super().__init__(model, settings, "normal")
        groups = sora_param_groups(self.model, lr=settings.lr, gate_lr=self.gate_lr, normalize_factors=True)
        self.optimizer = SoRAOptimizer(groups, lr=settings.lr)


BUILDERS = {
    "lora": (quality.LoRA, Arm()),
    "lora_r5": (lambda m, s: quality.LoRA(m, s, "target"), Arm()),
    "gated": (lambda m, s: Gated(m, s), Arm()),
    "sora_authors": (lambda m, s: Gated(m, s, weight_decay=0.1, lambda_=3e-4, threshold="fixed", gate_l1=10.0), Arm(clip=0.1, warmup=0.06)),
    "sora_budget": (lambda m, s: quality.SoRA(m, s, "normal"), Arm()),
    "sora_balanced": (Balanced, Arm()),
    "adalora": (quality.AdaLoRA, Arm()),
}

MODES = {
    "quick": dict(settings=Settings(encoder=quality.assets.MINILM, train=400, validation=200, test=400, epochs=10),
                  tasks=["rotten_tomatoes"], seeds=[0, 1, 2], lrs=[1e-3, 3e-3], arms=[a for a in ARMS if a != "adalora"]),  # fmt: skip
    "full": dict(settings=Settings(encoder=quality.assets.MINILM, train=1000, validation=300, test=1000, epochs=15),
                 tasks=list(TASKS), seeds=[0, 1, 2, 3, 4], lrs=[5e-4, 1e-3, 3e-3], arms=list(ARMS)),  # fmt: skip
}


def train(task, build, regime: Arm, seed: int, settings: Settings, splits: dict, model_path: Path, pad_id: int, on_epoch=None):
    """One training run of ``build``'s adapter; returns the runner (model and optimizer) and, per
    epoch, what ``on_epoch(runner)`` returned."""
    from transformers import AutoModelForSequenceClassification

    settings = dataclasses.replace(settings, warmup=regime.warmup, max_grad_norm=regime.clip)
    torch.manual_seed(seed)  # the same head initialisation for every arm of this seed
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(task.labels))
    model.train()
    runner = build(model, settings)
    config = TrainConfig(steps=settings.steps, warmup_steps=round(settings.warmup * settings.steps), lr=settings.lr, lr_decay="linear")
    trainable = [p for p in runner.model.parameters() if p.requires_grad]
    epochs, step = [], 0
    for epoch in range(settings.epochs):
        for indices in length_grouped_batches(splits["train"], settings.batch, seed * 1000 + epoch):
            batch = collate([splits["train"][i] for i in indices], pad_id)
            scale_learning_rates(runner.optimizer, lr_factor(step, config))
            runner.before_step(step)
            runner.model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            runner.optimizer.step()
            runner.after_step(step)
            runner.optimizer.zero_grad(set_to_none=True)
            step += 1
        if on_epoch is not None:
            epochs.append(on_epoch(runner))
    return runner, epochs


def run_one(task, arm: str, seed: int, settings: Settings, splits: dict, model_path: Path, pad_id: int) -> dict:
    """Validation after every epoch; the trainable tensors of the best epoch are kept, so the test
    set is read twice (at the best epoch and at the last), not every epoch."""
    build, regime = BUILDERS[arm]
    start, best = time.perf_counter(), {}

    def validate(runner) -> dict:
        accuracy = evaluate(runner.model, splits["validation"], len(task.labels), pad_id)["accuracy"]
        record = {"validation": accuracy, "kept": runner.adapter_params()[1]}
        if not best or accuracy >= best["validation"]:  # the later epoch on a tie
            state = {n: p.detach().clone() for n, p in runner.model.named_parameters() if p.requires_grad}
            best.update(record, epoch=len(best.get("seen", [])) + 1, state=state)
        best.setdefault("seen", []).append(accuracy)
        return record

    runner, epochs = train(task, build, regime, seed, settings, splits, model_path, pad_id, validate)
    test_last = evaluate(runner.model, splits["test"], len(task.labels), pad_id)["accuracy"]
    trainable_adapter, kept = runner.adapter_params()
    extra = runner.extra()
    with torch.no_grad():
        for name, param in runner.model.named_parameters():
            if name in best["state"]:
                param.copy_(best["state"][name])
    test_at_best = evaluate(runner.model, splits["test"], len(task.labels), pad_id)["accuracy"]
    return {"task": task.name, "arm": arm, "seed": seed, "lr": settings.lr, "steps": settings.steps, "epochs": epochs,
            "best_epoch": best["epoch"], "best_validation": best["validation"], "test_at_best": test_at_best,
            "kept_at_best": best["kept"], "test_last": test_last, "adapter_trainable": trainable_adapter,
            "adapter_kept": kept, "seconds": time.perf_counter() - start, **extra}  # fmt: skip


def summarize(results: list[dict], arms: list[str]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        chosen = {}
        for arm in arms:
            by_lr = {}
            for r in rows:
                if r["arm"] == arm:
                    by_lr.setdefault(r["lr"], []).append(r)
            if by_lr:
                chosen[arm] = max(by_lr.items(), key=lambda kv: statistics.mean(r["best_validation"] for r in kv[1]))
        reference = {r["seed"]: r["test_at_best"] for r in chosen.get("lora", (None, []))[1]}
        lines += [f"\n{task}: mean ± std over seeds; lr chosen on validation; Δ vs lora paired per seed (test at best epoch)\n",
                  "| arm | lr | seeds | test @ best val | test @ last | Δ vs lora (per seed) | adapter params kept @ best | % of lora r=8 |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lora_params = statistics.mean(r["adapter_kept"] for r in chosen["lora"][1]) if "lora" in chosen else None
        for arm, (lr, runs) in chosen.items():
            at_best = [100 * r["test_at_best"] for r in runs]
            last = [100 * r["test_last"] for r in runs]
            diffs = [100 * (r["test_at_best"] - reference[r["seed"]]) for r in runs if r["seed"] in reference]
            kept = statistics.mean(r["kept_at_best"] for r in runs)
            share = f"{100 * kept / lora_params:.0f}%" if lora_params else "-"
            lines.append(f"| {arm} | {lr:g} | {len(runs)} | {_ms(at_best)} | {_ms(last)} | {', '.join(f'{d:+.1f}' for d in diffs)} "
                         f"(mean {statistics.mean(diffs) if diffs else 0:+.2f}) | {kept:,.0f} | {share} |")  # fmt: skip
    return "\n".join(lines)


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"


def results_log(name: str, mode: str | None, settings: Settings, out: str | None = None) -> tuple[Path, list[dict]]:
    """``runs/<name>/<mode>-<settings hash>/results.jsonl`` and the runs already in it (a rerun skips
    them, so an interrupted benchmark continues)."""
    folder = Path(out or f"runs/{name}/{mode or 'quick'}-{settings.fingerprint()}")
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "results.jsonl"
    return file, [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def encoder(settings: Settings):
    """(the encoder's folder, its tokenizer), with torch at no more threads than this machine has cores for."""
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    path = quality.model_folder(settings.encoder)
    return path, AutoTokenizer.from_pretrained(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument("--full", action="store_const", const="full", dest="mode")
    parser.add_argument("--arms", help=f"comma-separated, from {list(ARMS)} (default: the mode's)")
    parser.add_argument("--tasks")
    parser.add_argument("--seeds")
    parser.add_argument("--lrs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Settings field (train=1000, epochs=15)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    spec = MODES[args.mode or "quick"]
    settings = quality.with_overrides(spec["settings"], args.set)
    tasks = args.tasks.split(",") if args.tasks else spec["tasks"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else spec["seeds"]
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else spec["lrs"]
    arms = args.arms.split(",") if args.arms else spec["arms"]
    results_file, results = results_log("regime", args.mode, settings, args.out)
    done = {(r["task"], r["arm"], r["seed"], r["lr"]) for r in results}
    model_path, tokenizer = encoder(settings)
    for task_name in tasks:
        task = TASKS[task_name]
        splits, _ = quality.load_splits(task, settings, tokenizer)
        for seed in seeds:
            for lr in lrs:
                for arm in arms:
                    if (task_name, arm, seed, lr) in done:
                        continue
                    result = run_one(task, arm, seed, dataclasses.replace(settings, lr=lr), splits, model_path, tokenizer.pad_token_id)
                    results.append(result)
                    with open(results_file, "a") as f:
                        f.write(json.dumps(result) + "\n")
                    print(f"{task_name} {arm} seed {seed} lr {lr:g}: test@best {100 * result['test_at_best']:.1f} (epoch {result['best_epoch']}), "
                          f"last {100 * result['test_last']:.1f}, kept {result['kept_at_best']:,}, {result['seconds']:.0f} s", flush=True)  # fmt: skip
    table = summarize([r for r in results if r["task"] in tasks and r["arm"] in arms], arms)
    (results_file.parent / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
