"""SFT quality: SoRA against LoRA on a 4-bit LLM fine-tuned on real instruction chats, with paired intervals.

The task. SmolLM2-135M-Instruct, NF4 4-bit with bf16 compute (as ``make demo``), fine-tuned on chats
built from BIG-bench's Natural Instructions (61 crowd-sourcing subtasks on real text: QA, question
generation, classification, paraphrase; Apache-2.0; ``sora_dist.data.assets.natural_instructions_path``):
the user turn is the subtask's one-line instruction and the example's input, the assistant turn its
first reference answer. Rows with an input over 700 characters or an answer over 300 are left out
(so no chat is truncated at 512 tokens). One seeded permutation (``data_seed``) gives the held-out
chats first, then the training chats. Training is ``sora-train`` itself: the chat template, loss on
the assistant turn only, packing into 512-token rows, AdamW at lr 1e-3 with 10% warm-up and linear
decay, r_max = 8 (alpha 16) on all seven projections.

Arms (every arm of a seed has the same data order and the same seed):

``lora``            plain LoRA r=8: the gates fixed at 1 (``gate_init: ones``, gate lr 0, λ = 0);
``lora_r4``         plain LoRA r=4 (alpha 8, the same alpha / r) everywhere: uniform at SoRA's budget;
``sora_budget``     SoRA r_max 8, budget mode to an average rank of 4 by 70% of the steps (the
                    default criterion: the soft threshold keeps the largest |g|);
``sora_balanced``   the same budget with ``normalize_factors`` (the largest |g| after the factor
                    norms are moved into the gates).

Metrics on the held-out chats, per chat, so that arms are compared chat by chat
(``benchmarks/paired.py``): the token cross-entropy of the assistant turn (the training loss on
unseen chats; the arm's value is token-weighted), and for the subtasks with one short right answer
(``EXACT_ANSWER``: yes/no judgements, multiple choice, short factual answers) whether the greedy
reply starts with the answer (``sora eval``'s generated accuracy). The base model before
training is scored too.

    python benchmarks/sft.py --quick            # lora and sora_budget, seeds 0 and 1: ~30 min on 2 CPU cores
    python benchmarks/sft.py                    # 4 arms x seeds 0, 1, 2
    python benchmarks/sft.py --arms lora,lora_r4,sora_budget --seeds 0,1,2
    python benchmarks/sft.py --gpu              # the GPU size: 50,000 chats, about one epoch (600 steps of 16 x 512 tokens)

Results: ``runs/sft/<mode>-<settings hash>/results.jsonl`` (one line per trained arm with its
per-chat scores; a rerun skips what is there) and ``table.md``. Each arm's run folder stays under
``runs/sft/.../<arm>-seed<k>`` (``sora chat`` / ``sora eval`` work on it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paired  # noqa: E402
import quality  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ("lora", "lora_r4", "sora_budget", "sora_balanced")
QUICK_ARMS = ("lora", "sora_budget")
# Subtasks whose examples have one short right answer: the generated-answer metric is read on them.
EXACT_ANSWER = (
    "subtask018_mctaco_temporal_reasoning_presence", "subtask019_mctaco_temporal_reasoning_category",
    "subtask020_mctaco_span_based_question", "subtask021_mctaco_grammatical_logical",
    "subtask022_cosmosqa_passage_inappropriate_binary", "subtask033_winogrande_answer_generation",
    "subtask041_qasc_answer_generation", "subtask043_essential_terms_answering_incomplete_questions",
    "subtask047_misc_answering_science_questions", "subtask050_multirc_answerability",
)  # fmt: skip
MAX_INPUT_CHARS, MAX_ANSWER_CHARS = 700, 300


@dataclasses.dataclass(frozen=True)
class Settings:
    train_chats: int = 1200
    test_chats: int = 600
    steps: int = 60
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    lr: float = 1e-3
    r_max: int = 8
    target_rank: int = 4
    budget_at: float = 0.7
    generate_tokens: int = 16
    data_seed: int = 1234

    def fingerprint(self) -> str:
        return quality.fingerprint(self)


MODES = {
    "quick": Settings(),
    "gpu": Settings(train_chats=50_000, test_chats=2_000, steps=600, micro_batch_size=16),
}


# -- data ---------------------------------------------------------------------------------------
def chat(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": f"{row['instruction']}\n\n{row['input'].strip()}"},
                         {"role": "assistant", "content": row["targets"][0].strip()}], "subtask": row["subtask"]}  # fmt: skip


def write_chats(settings: Settings, folder: Path) -> tuple[Path, Path, list[dict]]:
    """train.jsonl and test.jsonl of chat rows under ``folder``; returns their paths and the test rows."""
    from sora_dist.data.assets import natural_instructions_path

    rows = [json.loads(line) for line in natural_instructions_path().read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["input"].strip() and r["targets"][0].strip()
            and len(r["input"]) <= MAX_INPUT_CHARS and len(r["targets"][0]) <= MAX_ANSWER_CHARS]  # fmt: skip
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(settings.data_seed)).tolist()
    if settings.test_chats + settings.train_chats > len(order):
        raise SystemExit(f"{settings.test_chats + settings.train_chats} chats asked for; the filtered data has {len(order)}")
    test = [chat(rows[i]) for i in order[: settings.test_chats]]
    train = [chat(rows[i]) for i in order[settings.test_chats : settings.test_chats + settings.train_chats]]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, part in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return paths[0], paths[1], test


# -- arms ---------------------------------------------------------------------------------------
def run_config(arm: str, seed: int, settings: Settings, train_file: Path, output_dir: Path) -> dict:
    lora = arm in ("lora", "lora_r4")
    r = settings.target_rank if arm == "lora_r4" else settings.r_max
    config = {
        "model": {"path": "asset:SmolLM2-135M-Instruct", "dtype": "bfloat16", "quantization": "4bit", "bnb_4bit_quant_type": "nf4",
                  "bnb_4bit_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"},
        "sora": {"r": r, "alpha": 2.0 * r, "target_modules": PROJECTIONS, "gate_init": "ones" if lora else "normal"},
        "data": {"format": "chat", "train_file": str(train_file), "max_length": settings.max_length, "packing": True},
        "train": {"steps": settings.steps, "micro_batch_size": settings.micro_batch_size, "grad_accum": settings.grad_accum,
                  "lr": settings.lr, "warmup_steps": settings.steps // 10, "lr_decay": "linear", "seed": seed, "log_every": 10,
                  "report_to": "none", "output_dir": str(output_dir)},
    }  # fmt: skip
    if lora:
        config["train"]["gate_lr"] = 0.0
    else:
        config["sparsity_budget"] = {"target_rank": settings.target_rank, "by_step": round(settings.budget_at * settings.steps)}
    if arm == "sora_balanced":
        config["train"]["normalize_factors"] = True
    return config


def train_arm(arm: str, seed: int, settings: Settings, train_file: Path, folder: Path) -> tuple[Path, float]:
    """``sora-train`` on the arm's config in a subprocess (the product's own path); its log goes to train.log."""
    import yaml

    output_dir = folder / f"{arm}-seed{seed}"
    output_dir.mkdir(parents=True, exist_ok=True)
    config_file = output_dir.parent / f"{arm}-seed{seed}.yaml"
    config_file.write_text(yaml.safe_dump(run_config(arm, seed, settings, train_file, output_dir), sort_keys=False))
    start = time.perf_counter()
    with open(output_dir.parent / f"{arm}-seed{seed}.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "sora_dist.cli", "train", str(config_file)], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{arm} seed {seed}: sora-train failed (exit {done.returncode}); see {log.name}")
    return output_dir, time.perf_counter() - start


# -- scoring ------------------------------------------------------------------------------------
@torch.no_grad()
def score(loaded, test_file: Path, test_rows: list[dict], settings: Settings, batch: int = 16) -> dict:
    """Per held-out chat: summed cross-entropy of the assistant turn and its token count; on the
    EXACT_ANSWER chats, whether the greedy reply starts with the answer."""
    import functools

    from sora_dist.data.collate import pad_collate
    from sora_dist.data.pipeline import prepare_split
    from sora_dist.training.chunked_loss import row_token_losses
    from sora_dist.training.evaluate import IGNORE, generate_answers, is_correct
    from sora_dist.training.loop import token_losses

    tokenizer, model = loaded.tokenizer, loaded.model
    examples = prepare_split([str(test_file)], "test", tokenizer, "chat", settings.max_length, num_proc=1)
    if len(examples) != len(test_rows):
        raise RuntimeError(f"{test_file}: {len(examples)} tokenized chats for {len(test_rows)} rows")
    collate = functools.partial(pad_collate, pad_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
    nll, tokens = [], []
    for start in range(0, len(examples), batch):
        chunk = [examples[i] for i in range(start, min(start + batch, len(examples)))]
        inputs = collate(chunk)
        nll += row_token_losses(model, inputs, None, token_losses).double().tolist()
        tokens += (inputs["labels"][:, 1:] != IGNORE).sum(-1).tolist()
    exact = [i for i, row in enumerate(test_rows) if row["subtask"] in EXACT_ANSWER]
    correct = []
    for start in range(0, len(exact), 32):
        chunk = [examples[i] for i in exact[start : start + 32]]
        replies = generate_answers(model, chunk, tokenizer, len(chunk), settings.generate_tokens, loaded.device)
        correct += [int(is_correct(reply, example, tokenizer)) for reply, example in zip(replies, chunk)]
    return {"nll": [round(v, 4) for v in nll], "tokens": tokens, "exact_index": exact, "correct": "".join(map(str, correct)),
            "cross_entropy": sum(nll) / sum(tokens), "generated_accuracy": sum(correct) / max(len(correct), 1)}  # fmt: skip


def kept_params(run_dir: Path) -> tuple[int, float]:
    """(adapter parameters of the live ranks, average live rank) from the run's final sparsity report."""
    report = json.loads((run_dir / "sparsity.json").read_text())
    return int(report["total_params"]), float(report["live_rank"]) / max(len(report["modules"]), 1)


# -- tables -------------------------------------------------------------------------------------
def per_chat(rows: list[dict]) -> tuple[dict, dict, dict]:
    """({seed: per-chat mean CE}, {seed: tokens}, {seed: 1/0 per exact-answer chat})."""
    ce = {r["seed"]: torch.tensor(r["nll"], dtype=torch.float64) / torch.tensor(r["tokens"], dtype=torch.float64) for r in rows}
    tokens = {r["seed"]: torch.tensor(r["tokens"], dtype=torch.float64) for r in rows}
    right = {r["seed"]: torch.tensor([float(c) for c in r["correct"]]) for r in rows}
    return ce, tokens, right


def table(rows: list[dict], arms: list[str], seeds: list[int]) -> str:
    base = [r for r in rows if r["arm"] == "base"]
    by_arm = {a: [r for r in rows if r["arm"] == a and r["seed"] in seeds] for a in arms}
    lines = ["| arm | seeds | held-out CE (mean ± std) | generated accuracy | adapter params kept | % of lora | avg live rank | train s (median) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lora = statistics.mean(r["params"] for r in by_arm["lora"]) if by_arm.get("lora") else None
    if base:
        lines.append(f"| base (no training) | - | {base[0]['cross_entropy']:.4f} | {100 * base[0]['generated_accuracy']:.1f} | 0 | - | - | - |")
    for arm, runs in by_arm.items():
        if runs:
            ce = [r["cross_entropy"] for r in runs]
            acc = [100 * r["generated_accuracy"] for r in runs]
            params = statistics.mean(r["params"] for r in runs)
            lines.append(f"| {arm} | {len(runs)} | {statistics.mean(ce):.4f} ± {statistics.stdev(ce) if len(ce) > 1 else 0:.4f} | "
                         f"{statistics.mean(acc):.1f} ± {statistics.stdev(acc) if len(acc) > 1 else 0:.1f} | {params:,.0f} | "
                         f"{100 * params / lora:.0f}% | {statistics.mean(r['avg_rank'] for r in runs):.2f} | "
                         f"{statistics.median(r['train_seconds'] for r in runs):.0f} |" if lora else "")  # fmt: skip
    pairs = [("sora_budget", "lora"), ("sora_budget", "lora_r4"), ("sora_balanced", "lora"), ("sora_balanced", "lora_r4"),
             ("sora_balanced", "sora_budget"), ("lora_r4", "lora")]  # fmt: skip
    lines += ["\nPaired differences B - A over seeds and held-out chats (* = the 95% interval excludes 0). "
              "Lower cross-entropy is better: a negative Δ CE favours B.\n",
              "| B - A | seeds | Δ CE, nats/token [95% interval] | se | se: seeds | se: chats | bootstrap 95% | "
              "Δ generated accuracy, points [95% interval] | se |", "|---" * 9 + "|"]  # fmt: skip
    for b, a in pairs:
        if by_arm.get(a) and by_arm.get(b):
            ce_a, tok_a, right_a = per_chat(by_arm[a])
            ce_b, _, right_b = per_chat(by_arm[b])
            ce = paired.paired(ce_a, ce_b, weights=tok_a)
            acc = paired.paired(right_a, right_b, scale=100)
            seeds = "-" if ce["se_seeds"] is None else f"{ce['se_seeds']:.4f}"
            lines.append(f"| {b} - {a} | {len(ce['seeds'])} | {paired.describe(ce, 4)} | {ce['se']:.4f} | {seeds} | {ce['se_examples']:.4f} | "
                         f"[{ce['boot_low']:+.4f}, {ce['boot_high']:+.4f}] | {paired.describe(acc)} | {acc['se']:.2f} |")  # fmt: skip
    return "\n".join(line for line in lines if line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"arms {', '.join(QUICK_ARMS)} only")
    mode.add_argument("--gpu", action="store_true", help="the GPU size (MODES['gpu'])")
    parser.add_argument("--arms", help=f"comma-separated, from {list(ARMS)}")
    parser.add_argument("--seeds", help="comma-separated (default 0,1,2; 0,1 with --quick)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Settings field")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    try:
        settings = quality.with_overrides(MODES["gpu" if args.gpu else "quick"], args.set)
    except ValueError as err:
        parser.error(f"--set: {err}")
    arms = args.arms.split(",") if args.arms else list(QUICK_ARMS if args.quick else ARMS)
    if "lora" not in arms:
        arms.insert(0, "lora")  # the reference every comparison and the size share need
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    folder = Path(args.out or f"runs/sft/{'gpu' if args.gpu else 'cpu'}-{settings.fingerprint()}").resolve()
    results_file = folder / "results.jsonl"
    rows = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.is_file() else []
    train_file, test_file, test_rows = write_chats(settings, folder / "data")
    print(f"sft benchmark: {settings}; {len(test_rows)} held-out chats, {sum(r['subtask'] in EXACT_ANSWER for r in test_rows)} "
          f"with one right answer; results in {folder}", flush=True)  # fmt: skip

    from sora_dist.inference import load_for_inference

    def record(row: dict) -> None:
        rows.append(row)
        with open(results_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    if not any(r["arm"] == "base" for r in rows):
        from sora_dist.data.assets import smollm2_path

        loaded = load_for_inference(base=str(smollm2_path()), dtype="bfloat16", verbose=False)
        record({"arm": "base", "seed": None, **score(loaded, test_file, test_rows, settings)})
    started = time.perf_counter()
    for seed in seeds:
        for arm in arms:
            if any((r["arm"], r["seed"]) == (arm, seed) for r in rows):
                continue
            run_dir, seconds = train_arm(arm, seed, settings, train_file, folder)
            loaded = load_for_inference(model=str(run_dir), verbose=False)
            params, avg_rank = kept_params(run_dir)
            scores = score(loaded, test_file, test_rows, settings)
            record({"arm": arm, "seed": seed, "params": params, "avg_rank": avg_rank, "train_seconds": seconds, **scores})
            print(f"[{time.perf_counter() - started:6.0f}s] seed {seed} {arm}: held-out CE {scores['cross_entropy']:.4f}, "
                  f"generated accuracy {100 * scores['generated_accuracy']:.1f}, kept {params:,} (avg rank {avg_rank:.2f}), "
                  f"trained in {seconds:.0f} s", flush=True)  # fmt: skip
    text = table(rows, arms, seeds)
    (folder / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
