"""E2 and E3: is SoRA's learned allocation good, and what decides which ranks die?

Same tasks, data subsets, encoder and training loop as ``benchmarks/regime.py`` (E1).

E2, the allocation. Budget-mode SoRA (average rank 5 of r_max 8; ``--source sora_balanced`` for the
scale-moving variant) learns a rank per module; PEFT LoRA is then trained from scratch with

``learned``   those ranks (``rank_pattern``; ``alpha_pattern`` keeps SoRA's scale alpha / r_max),
``uniform``   r = 5 everywhere (about the same size),
``shuffled``  the learned ranks permuted among the modules of one kind (all queries, all keys, ...):
              the same size and the same rank per kind, a random placement across layers.

E3, the deaths. A gated adapter with nothing pruned (λ = 0) is trained; per rank we record the
initial and final |g|, ‖A_i‖·‖B_i‖, the contribution s·|g_i|·‖A_i‖·‖B_i‖ and |g_i·∂L/∂g_i| (the
gradient over 8 training batches), their Spearman correlations, and the validation accuracy after
pruning, at once and without retraining, the same number of ranks (SoRA's budget: 3 of 8 per module
on average) by each measure and at random.

    python benchmarks/allocation.py --quick     # rotten_tomatoes, 3 seeds, lr 1e-3
    python benchmarks/allocation.py --full      # 3 tasks, 5 seeds

Results: ``runs/allocation/<mode>-<settings hash>/results.jsonl`` (resumable) and ``table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
import regime  # noqa: E402
from quality import TASKS, collate, evaluate, head_names, length_grouped_batches  # noqa: E402

from sora_dist import sora_modules, sparsity_report  # noqa: E402

MEASURES = ("initial_abs_g", "final_abs_g", "factor_norms", "contribution", "abs_g_grad")


def learned_ranks(source: str, task, seed, settings, splits, model_path, pad_id) -> dict[str, int]:
    build, arm = regime.BUILDERS[source]
    runner, _ = regime.train(task, build, arm, seed, settings, splits, model_path, pad_id)
    return {m.name: m.live_rank for m in sparsity_report(runner.model).modules}


def lora_with_ranks(ranks: dict[str, int]):
    """A builder of PEFT LoRA with one rank per module (0: no adapter) and SoRA's scale alpha / r_max."""

    def build(model, settings):
        import peft

        kept = {name: r for name, r in ranks.items() if r > 0}
        config = peft.LoraConfig(r=settings.r_max, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=list(kept),
                                 rank_pattern={re.escape(name): r for name, r in kept.items()},
                                 alpha_pattern={re.escape(name): settings.alpha * r / settings.r_max for name, r in kept.items()},
                                 modules_to_save=head_names(model))  # fmt: skip
        return quality.PeftMethod(model, settings, config)

    return build


def shuffled(ranks: dict[str, int], seed: int) -> dict[str, int]:
    """The ranks permuted among the modules of one kind (the last part of the name)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    kinds: dict[str, list[str]] = {}
    for name in ranks:
        kinds.setdefault(".".join(name.split(".")[-2:]), []).append(name)
    for names in kinds.values():
        order = torch.randperm(len(names), generator=generator).tolist()
        out.update({name: ranks[names[k]] for name, k in zip(names, order)})
    return out


def e2(task, seed, settings, splits, model_path, pad_id, source: str) -> list[dict]:
    ranks = learned_ranks(source, task, seed, settings, splits, model_path, pad_id)
    uniform = {name: settings.target_rank for name in ranks}
    rows = []
    for arm, pattern in (("learned", ranks), ("uniform", uniform), ("shuffled", shuffled(ranks, seed))):
        runner, _ = regime.train(task, lora_with_ranks(pattern), regime.Arm(), seed, settings, splits, model_path, pad_id)
        test = evaluate(runner.model, splits["test"], len(task.labels), pad_id)["accuracy"]
        rows.append({"experiment": "e2", "task": task.name, "seed": seed, "arm": arm, "source": source, "test": test,
                     "params": runner.adapter_params()[0], "ranks": pattern})  # fmt: skip
    return rows


def rank_measures(model, splits, pad_id, settings, seed, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every measure of MEASURES, per rank, concatenated over the modules in order."""
    modules = list(sora_modules(model))
    for _, m in modules:
        m.gate.grad = None
    batches = length_grouped_batches(splits["train"], settings.batch, seed * 1000 + 999)[:8]
    for indices in batches:
        (model(**collate([splits["train"][i] for i in indices], pad_id)).loss / len(batches)).backward()
    with torch.no_grad():
        cols = {k: [] for k in MEASURES}
        for name, m in modules:
            g = m.gate.detach().double()
            norms = m.lora_A.detach().double().norm(dim=1) * m.lora_B.detach().double().norm(dim=0)
            cols["initial_abs_g"].append(initial[name].double().abs())
            cols["final_abs_g"].append(g.abs())
            cols["factor_norms"].append(norms)
            cols["contribution"].append(m.scale * g.abs() * norms)
            cols["abs_g_grad"].append((g * m.gate.grad.double()).abs())
    model.zero_grad(set_to_none=True)
    return {k: torch.cat(v) for k, v in cols.items()}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def e3(task, seed, settings, splits, model_path, pad_id) -> list[dict]:
    initial = {}

    def build(model, s):
        runner = regime.Gated(model, s)
        initial.update({name: m.gate.detach().clone() for name, m in sora_modules(runner.model)})
        return runner

    runner, _ = regime.train(task, build, regime.Arm(), seed, settings, splits, model_path, pad_id)
    model = runner.model
    measures = rank_measures(model, splits, pad_id, settings, seed, initial)
    gates = [m.gate for _, m in sora_modules(model)]
    saved = [g.detach().clone() for g in gates]
    keep = settings.target_rank * len(gates)
    scores = {"unpruned": evaluate(model, splits["validation"], len(task.labels), pad_id)["accuracy"]}
    generator = torch.Generator().manual_seed(20_000 + seed)
    criteria = {**measures, "random": torch.rand(len(measures["contribution"]), generator=generator, dtype=torch.float64)}
    for name, score in criteria.items():
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[score.argsort(descending=True)[:keep]] = True
        with torch.no_grad():
            for gate, kept in zip(gates, mask.split([g.numel() for g in gates])):
                gate.mul_(kept.to(gate.dtype))
        scores[name] = evaluate(model, splits["validation"], len(task.labels), pad_id)["accuracy"]
        with torch.no_grad():
            for gate, value in zip(gates, saved):
                gate.copy_(value)
    correlations = {f"{a}~{b}": spearman(measures[a], measures[b]) for i, a in enumerate(MEASURES) for b in MEASURES[i + 1 :]}
    return [{"experiment": "e3", "task": task.name, "seed": seed, "validation_after_pruning": scores, "spearman": correlations,
             "ranks": len(measures["contribution"]), "kept": keep}]  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        e2_rows = [r for r in rows if r["experiment"] == "e2" and r["task"] == task]
        if e2_rows:
            lines += [f"\nE2 {task}: PEFT LoRA, test accuracy (mean ± std over seeds), paired difference vs learned\n",
                      "| ranks | seeds | test | Δ vs learned (per seed) | adapter params |", "|---|---|---|---|---|"]  # fmt: skip
            learned = {r["seed"]: r["test"] for r in e2_rows if r["arm"] == "learned"}
            for arm in ("learned", "uniform", "shuffled"):
                runs = [r for r in e2_rows if r["arm"] == arm]
                diffs = [100 * (r["test"] - learned[r["seed"]]) for r in runs if r["seed"] in learned]
                lines.append(f"| {arm} | {len(runs)} | {regime._ms([100 * r['test'] for r in runs])} | "
                             f"{', '.join(f'{d:+.1f}' for d in diffs)} | {statistics.mean(r['params'] for r in runs):,.0f} |")  # fmt: skip
        e3_rows = [r for r in rows if r["experiment"] == "e3" and r["task"] == task]
        if e3_rows:
            names = list(e3_rows[0]["validation_after_pruning"])
            lines += [f"\nE3 {task}: validation accuracy after one-shot pruning to {e3_rows[0]['kept']} of {e3_rows[0]['ranks']} ranks "
                      "(no retraining), mean ± std over seeds\n", "| kept by | validation |", "|---|---|"]  # fmt: skip
            for name in names:
                lines.append(f"| {name} | {regime._ms([100 * r['validation_after_pruning'][name] for r in e3_rows])} |")
            lines += ["\nSpearman correlation of the per-rank measures (mean over seeds)\n", "| pair | ρ |", "|---|---|"]
            for pair in e3_rows[0]["spearman"]:
                lines.append(f"| {pair} | {statistics.mean(r['spearman'][pair] for r in e3_rows):+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument("--full", action="store_const", const="full", dest="mode")
    parser.add_argument("--experiments", default="e2,e3")
    parser.add_argument("--source", default="sora_budget", choices=["sora_budget", "sora_balanced"], help="E2: whose learned ranks")
    parser.add_argument("--seeds")
    parser.add_argument("--tasks")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Settings field")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    spec = regime.MODES[args.mode or "quick"]
    settings = quality.with_overrides(dataclasses.replace(spec["settings"], lr=args.lr), args.set)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else spec["seeds"]
    tasks = args.tasks.split(",") if args.tasks else spec["tasks"]
    results_file, rows = regime.results_log("allocation", args.mode, settings, args.out)
    done = {(r["experiment"], r["task"], r["seed"], r.get("source")) for r in rows}
    model_path, tokenizer = regime.encoder(settings)
    for task_name in tasks:
        task = TASKS[task_name]
        splits, _ = quality.load_splits(task, settings, tokenizer)
        for seed in seeds:
            for experiment in args.experiments.split(","):
                source = args.source if experiment == "e2" else None
                if (experiment, task_name, seed, source) in done:
                    continue
                if experiment == "e2":
                    new = e2(task, seed, settings, splits, model_path, tokenizer.pad_token_id, args.source)
                else:
                    new = e3(task, seed, settings, splits, model_path, tokenizer.pad_token_id)
                rows += new
                with open(results_file, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
                print(f"{task_name} {experiment} seed {seed}: done", flush=True)
    text = table([r for r in rows if r["task"] in tasks])
    (results_file.parent / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
