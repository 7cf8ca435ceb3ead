"""SoRA against LoRA, the learned allocation (E2) and the pruning criteria (E3), with paired intervals.

Same task, encoder and training loop as ``benchmarks/regime.py`` (E1: Rotten Tomatoes, all-MiniLM-L6-v2,
400 training examples x 10 epochs), one learning rate (1e-3) for every arm, and a test subset of
4,000 examples (10x E1's) on which every arm is scored example by example: right or wrong, and the
log-likelihood of the correct label. Every arm of a seed starts from the same head initialisation
and sees the same batches, so arms are compared seed by seed and example by example
(``benchmarks/paired.py``: a t interval over seeds, and a paired bootstrap over seeds and examples).

Trained per seed:

``lora``           PEFT LoRA r=8 (r_max): the reference;
``sora_budget``    budget mode to an average rank of 5 (the default: the soft threshold keeps the largest |g|);
``sora_balanced``  the same budget with ``normalize_factors`` (it keeps the largest |g| after the
                   factors' norms are moved into the gates, i.e. the largest contributions);
``gated``          SoRA's gated adapter, nothing pruned (λ = 0); it records, per rank, an EMA
                   (β = 0.85, after every step) of the sensitivity |g · ∂L/∂g|;
``learned``        E2: PEFT LoRA from scratch with sora_budget's learned ranks (``rank_pattern``;
                   ``alpha_pattern`` keeps SoRA's scale alpha / r_max);
``uniform``        E2: PEFT LoRA r=5 everywhere (about the same size);
``shuffled``       E2: the learned ranks permuted among the modules of one kind (all queries, ...).

E3 prunes the trained ``gated`` adapter at once, without retraining, to an average of 5 (the budget)
and of 2 ranks per module, keeping the ranks with the largest final |g|, |g| after
``normalize_factors`` (s·|g_i|·‖A_i‖·‖B_i‖), sensitivity EMA, ‖A_i‖·‖B_i‖, or at random, and scores
each on the test subset (the initial |g| enters the correlations only: it ranks as the final |g| does).

    python benchmarks/allocation.py --quick                     # 3 seeds: ~20 min on 2 CPU cores
    python benchmarks/allocation.py --quick --seeds 0,1,2,3,4   # adds seeds 3 and 4 to the same results
    python benchmarks/allocation.py --full                      # 3 tasks, 5 seeds, 1,000 examples x 15 epochs (not run here)

Results: ``runs/allocation/<mode>-<settings hash>/results.jsonl`` (one line per trained arm or
pruned model, with its per-example scores; a rerun skips what is there) and ``table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paired  # noqa: E402
import quality  # noqa: E402
import regime  # noqa: E402
from quality import TASKS, head_names, per_example  # noqa: E402

from sora_dist import sora_modules, sparsity_report  # noqa: E402

ARMS = ("lora", "sora_budget", "sora_balanced", "gated", "learned", "uniform", "shuffled")
CRITERIA = ("final_abs_g", "balanced_abs_g", "sensitivity_ema", "random", "factor_norms")
KEEP = (5, 2)  # ranks kept per module on average in E3
EMA_BETA = 0.85
MODES = {
    "quick": dict(settings=dataclasses.replace(regime.MODES["quick"]["settings"], test=4000), tasks=["rotten_tomatoes"], seeds=[0, 1, 2]),
    "full": dict(settings=dataclasses.replace(regime.MODES["full"]["settings"], test=4000), tasks=list(TASKS), seeds=[0, 1, 2, 3, 4]),
}


class GatedWithSensitivity(regime.Gated):
    """The gated adapter (λ = 0) recording its initial gates and an EMA of |g · ∂L/∂g| per rank."""

    def __init__(self, model, settings):
        super().__init__(model, settings)
        self.initial = {name: m.gate.detach().clone() for name, m in sora_modules(self.model)}
        self.ema = {name: torch.zeros(m.gate.shape, dtype=torch.float64) for name, m in sora_modules(self.model)}

    def after_step(self, step: int) -> None:
        # After the optimizer step, before zero_grad: this step's (clipped) gate gradients.
        for name, m in sora_modules(self.model):
            self.ema[name].mul_(EMA_BETA).add_((m.gate.detach() * m.gate.grad).abs().double(), alpha=1 - EMA_BETA)


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


def scored(model, splits, pad_id) -> dict:
    correct, logp = per_example(model, splits["test"], pad_id)
    return {"accuracy": float(correct.mean()), "correct": "".join(str(int(c)) for c in correct.tolist()),
            "logp": [round(v, 5) for v in logp.tolist()]}  # fmt: skip


def builder(arm: str, seed: int, rows: list[dict], task: str):
    if arm == "lora":
        return quality.LoRA
    if arm == "sora_budget":
        return lambda m, s: quality.SoRA(m, s, "normal")
    if arm == "sora_balanced":
        return regime.Balanced
    if arm == "gated":
        return GatedWithSensitivity
    learned = next(r["ranks"] for r in rows if (r["kind"], r["task"], r["seed"], r.get("arm")) == ("arm", task, seed, "sora_budget"))
    pattern = {"learned": learned, "uniform": None, "shuffled": shuffled(learned, seed)}[arm]
    return lora_with_ranks(pattern) if pattern is not None else (lambda m, s: quality.LoRA(m, s, "target"))


def measures(runner) -> dict[str, torch.Tensor]:
    """Every pruning criterion of CRITERIA, per rank, concatenated over the modules in order."""
    cols = {k: [] for k in CRITERIA + ("initial_abs_g",) if k != "random"}  # the initial |g|: for the correlations
    with torch.no_grad():
        for name, m in sora_modules(runner.model):
            g = m.gate.detach().double()
            norms = m.lora_A.detach().double().norm(dim=1) * m.lora_B.detach().double().norm(dim=0)
            cols["final_abs_g"].append(g.abs())
            cols["balanced_abs_g"].append(m.scale * g.abs() * norms)
            cols["sensitivity_ema"].append(runner.ema[name])
            cols["initial_abs_g"].append(runner.initial[name].double().abs())
            cols["factor_norms"].append(norms)
    return {k: torch.cat(v) for k, v in cols.items()}


def prune_rows(runner, task: str, seed: int, splits, pad_id) -> list[dict]:
    """E3: the trained gated adapter pruned at once by every criterion to every level of KEEP."""
    found = measures(runner)
    generator = torch.Generator().manual_seed(20_000 + seed)
    found["random"] = torch.rand(len(found["final_abs_g"]), generator=generator, dtype=torch.float64)
    gates = [m.gate for _, m in sora_modules(runner.model)]
    saved = [g.detach().clone() for g in gates]
    rows = [{"kind": "prune", "task": task, "seed": seed, "criterion": "unpruned", "keep": 8, **scored(runner.model, splits, pad_id)}]
    for keep in KEEP:
        for criterion in CRITERIA:
            mask = torch.zeros(len(found[criterion]), dtype=torch.bool)
            mask[found[criterion].argsort(descending=True)[: keep * len(gates)]] = True
            with torch.no_grad():
                for gate, kept in zip(gates, mask.split([g.numel() for g in gates])):
                    gate.mul_(kept.to(gate.dtype))
            rows.append({"kind": "prune", "task": task, "seed": seed, "criterion": criterion, "keep": keep,
                         **scored(runner.model, splits, pad_id)})  # fmt: skip
            with torch.no_grad():
                for gate, value in zip(gates, saved):
                    gate.copy_(value)
    names = [c for c in found if c != "random"]
    rows.append({"kind": "spearman", "task": task, "seed": seed,
                 "correlations": {f"{a}~{b}": spearman(found[a], found[b]) for i, a in enumerate(names) for b in names[i + 1 :]}})  # fmt: skip
    return rows


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run_arm(arm: str, task, seed: int, settings, splits, model_path, pad_id, rows: list[dict]) -> list[dict]:
    start = time.perf_counter()
    runner, _ = regime.train(task, builder(arm, seed, rows, task.name), regime.Arm(), seed, settings, splits, model_path, pad_id)
    row = {"kind": "arm", "task": task.name, "seed": seed, "arm": arm, "lr": settings.lr, "params": runner.adapter_params()[1],
           **scored(runner.model, splits, pad_id)}  # fmt: skip
    if arm == "sora_budget":
        row["ranks"] = {m.name: m.live_rank for m in sparsity_report(runner.model).modules}
    row["seconds"] = time.perf_counter() - start
    out = [row]
    if arm == "gated":
        out += prune_rows(runner, task.name, seed, splits, pad_id)
    return out


# -- tables -------------------------------------------------------------------------------------
def values(rows: list[dict], metric: str) -> dict[int, torch.Tensor]:
    if metric == "accuracy":
        return {r["seed"]: torch.tensor([float(c) for c in r["correct"]]) for r in rows}
    return {r["seed"]: torch.tensor(r["logp"], dtype=torch.float64) for r in rows}


def comparison(a: list[dict], b: list[dict]) -> tuple[dict, dict]:
    """B - A: (accuracy in points, log-likelihood of the correct label in nats)."""
    return paired.paired(values(a, "accuracy"), values(b, "accuracy"), scale=100), paired.paired(values(a, "logp"), values(b, "logp"))


def comparison_row(label: str, a: list[dict], b: list[dict]) -> str:
    acc, ll = comparison(a, b)
    seeds = "-" if acc["se_seeds"] is None else f"{acc['se_seeds']:.2f}"
    return (f"| {label} | {len(acc['seeds'])} | {paired.describe(acc)} | {acc['se']:.2f} | {seeds} | {acc['se_examples']:.2f} | "
            f"[{acc['boot_low']:+.2f}, {acc['boot_high']:+.2f}] | {paired.describe(ll, 4)} | {ll['se']:.4f} |")  # fmt: skip


HEADER = ("| comparison (B - A) | seeds | Δ accuracy, points [95% interval] | se | se: seeds | se: test examples | bootstrap 95% | "
          "Δ log-lik of the label, nats [95% interval] | se |")  # fmt: skip
RULE = "|---" * 9 + "|"


def table(rows: list[dict], seeds: list[int]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        arms = {a: [r for r in rows if r["kind"] == "arm" and r["task"] == task and r["arm"] == a and r["seed"] in seeds] for a in ARMS}
        common = set.intersection(*[{r["seed"] for r in runs} for runs in arms.values() if runs]) if any(arms.values()) else set()
        arms = {a: [r for r in runs if r["seed"] in common] for a, runs in arms.items()}
        lines += [f"\n### {task}: the arms ({len(common)} seeds; test subset {len(next(iter(arms.values()))[0]['correct']) if common else 0})\n",
                  "| arm | accuracy (mean ± std over seeds) | mean log-lik of the label | adapter params kept | % of lora |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lora_params = statistics.mean(r["params"] for r in arms["lora"]) if arms["lora"] else None
        for arm, runs in arms.items():
            if runs:
                params = statistics.mean(r["params"] for r in runs)
                share = f"{100 * params / lora_params:.0f}%" if lora_params else "-"
                lines.append(f"| {arm} | {regime._ms([100 * r['accuracy'] for r in runs])} | "
                             f"{statistics.mean(statistics.mean(r['logp']) for r in runs):.4f} | {params:,.0f} | {share} |")  # fmt: skip
        pairs = [("sora_budget - lora", "lora", "sora_budget"), ("sora_balanced - lora", "lora", "sora_balanced"),
                 ("gated - lora", "lora", "gated"), ("sora_balanced - sora_budget", "sora_budget", "sora_balanced"),
                 ("sora_budget - uniform (E2)", "uniform", "sora_budget"), ("learned - uniform (E2)", "uniform", "learned"),
                 ("learned - shuffled (E2)", "shuffled", "learned")]  # fmt: skip
        lines += ["\nPaired differences (* = the 95% interval excludes 0)\n", HEADER, RULE]
        lines += [comparison_row(label, arms[a], arms[b]) for label, a, b in pairs if arms[a] and arms[b]]
        pruned = [r for r in rows if r["kind"] == "prune" and r["task"] == task and r["seed"] in common]
        if pruned:
            of = lambda criterion, keep: [r for r in pruned if (r["criterion"], r["keep"]) == (criterion, keep)]  # noqa: B023, E731
            for keep in KEEP:
                lines += [f"\nE3: the gated adapter pruned at once to {keep} of 8 ranks per module on average (no retraining), "
                          "against pruning by the final |g|\n", "| kept by | accuracy | " + HEADER.split("|", 2)[2], RULE + "---|"]  # fmt: skip
                reference = of("final_abs_g", keep)
                for criterion in ("unpruned",) + CRITERIA:
                    runs = of(criterion, 8 if criterion == "unpruned" else keep)
                    if runs and criterion != "final_abs_g":
                        row = comparison_row(criterion, reference, runs)
                        lines.append(f"| {criterion} | {regime._ms([100 * r['accuracy'] for r in runs])} |" + row.split("|", 2)[2])
                    elif runs:
                        lines.append(f"| final_abs_g | {regime._ms([100 * r['accuracy'] for r in runs])} |" + " |" * 9)
            correlations = [r["correlations"] for r in rows if r["kind"] == "spearman" and r["task"] == task and r["seed"] in common]
            lines += ["\nSpearman correlation of the per-rank criteria (mean over seeds)\n", "| pair | ρ |", "|---|---|"]
            lines += [f"| {pair} | {statistics.mean(c[pair] for c in correlations):+.2f} |" for pair in correlations[0]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument("--full", action="store_const", const="full", dest="mode")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated (learned/shuffled need sora_budget of the same seed)")
    parser.add_argument("--seeds")
    parser.add_argument("--tasks")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Settings field")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    spec = MODES[args.mode or "quick"]
    settings = quality.with_overrides(dataclasses.replace(spec["settings"], lr=args.lr), args.set)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else spec["seeds"]
    tasks = args.tasks.split(",") if args.tasks else spec["tasks"]
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    arms.sort(key=ARMS.index)  # sora_budget before the E2 arms that use its ranks
    results_file, rows = regime.results_log("allocation", args.mode, settings, args.out)
    model_path, tokenizer = regime.encoder(settings)
    started = time.perf_counter()
    for task_name in tasks:
        task = TASKS[task_name]
        splits, _ = quality.load_splits(task, settings, tokenizer)
        for seed in seeds:
            for arm in arms:
                if any((r["kind"], r["task"], r["seed"], r.get("arm")) == ("arm", task_name, seed, arm) for r in rows):
                    continue
                new = run_arm(arm, task, seed, settings, splits, model_path, tokenizer.pad_token_id, rows)
                rows += new
                with open(results_file, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
                print(f"[{time.perf_counter() - started:6.0f}s] {task_name} seed {seed} {arm}: accuracy {100 * new[0]['accuracy']:.2f}, "
                      f"kept {new[0]['params']:,} ({new[0]['seconds']:.0f} s)", flush=True)  # fmt: skip
    text = table([r for r in rows if r["task"] in tasks], seeds)
    (results_file.parent / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
