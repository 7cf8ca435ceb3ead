"""Quick start: SoRA on a real pretrained LLM, end to end, in a few minutes on a CPU.

SmolLM2-135M-Instruct learns Rotten Tomatoes sentiment as an instruction ("positive" or
"negative"). The script measures accuracy before and after, prints the sparsity report, prunes
the dead ranks, saves the adapter, merges it into the base weights and checks that the merged
model answers like the adapter model. Everything it writes goes under ``--out`` (``runs/``).

    python examples/quickstart.py [--steps 80] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sora_dist import (
    LambdaSchedule,
    SoRAConfig,
    SoRAOptimizer,
    inject_sora,
    merge_sora,
    prune_sora,
    save_sora,
    sora_param_groups,
    sparsity_report,
)
from sora_dist.assets import rotten_tomatoes_path, smollm2_path

PROMPT = "Review: {text}\nIs this movie review positive or negative? Answer:"
LABELS = ("positive", "negative")


def load_examples(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in rotten_tomatoes_path().read_text().splitlines()]
    rows = [r for r in rows if len(r["text"]) < 300]
    random.Random(seed).shuffle(rows)
    return rows[:n_train], rows[n_train : n_train + n_eval]


def encode(tokenizer, rows: list[dict], device) -> dict:
    """Left-padded prompts + answer; labels only on the answer token."""
    prompts = [tokenizer(PROMPT.format(text=r["text"]))["input_ids"] for r in rows]
    answers = [tokenizer(" " + r["label"])["input_ids"][:1] for r in rows]
    width = max(len(p) + 1 for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask, labels = [], [], []
    for p, a in zip(prompts, answers):
        fill = width - len(p) - 1
        ids.append([pad] * fill + p + a)
        mask.append([0] * fill + [1] * (len(p) + 1))
        labels.append([-100] * (fill + len(p)) + a)
    as_tensor = lambda x: torch.tensor(x, device=device)  # noqa: E731
    return {"input_ids": as_tensor(ids), "attention_mask": as_tensor(mask), "labels": as_tensor(labels)}


@torch.no_grad()
def answer_logits(model, tokenizer, rows: list[dict], device, batch: int = 32) -> torch.Tensor:
    """Logits of the two label words at the answer position, one row per example."""
    label_ids = [tokenizer(" " + label)["input_ids"][0] for label in LABELS]
    out = []
    for i in range(0, len(rows), batch):
        enc = encode(tokenizer, rows[i : i + batch], device)
        logits = model(input_ids=enc["input_ids"][:, :-1], attention_mask=enc["attention_mask"][:, :-1]).logits
        out.append(logits[:, -1, label_ids].float().cpu())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, rows: list[dict]) -> float:
    truth = torch.tensor([LABELS.index(r["label"]) for r in rows])
    return float((logits.argmax(-1) == truth).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--gate-lr", type=float, default=2e-2)
    parser.add_argument("--lambda", dest="lambda_", type=float, default=0.5)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="base model dtype; adapters stay fp32")
    parser.add_argument("--out", default="runs/quickstart")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out = Path(args.out)

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device)
    train_rows, eval_rows = load_examples(args.steps * args.batch, args.eval, args.seed)

    model.eval()
    acc_before = accuracy(answer_logits(model, tokenizer, eval_rows, device), eval_rows)
    print(f"accuracy before fine-tuning: {acc_before:.3f} on {len(eval_rows)} held-out reviews")

    inject_sora(model, SoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optimizer = SoRAOptimizer(sora_param_groups(model, lr=args.lr, gate_lr=args.gate_lr, lambda_=0.0))
    lambdas = LambdaSchedule("linear", start=0.0, end=args.lambda_, steps=args.steps // 2)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        batch = encode(tokenizer, train_rows[step * args.batch : (step + 1) * args.batch], device)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lam = lambdas.step(optimizer)
        if step % 10 == 0 or step == args.steps - 1:
            live = sparsity_report(model).live_rank
            print(f"step {step:4d}  loss {loss.item():.4f}  lambda {lam:.3f}  live ranks {live}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")

    model.eval()
    adapter_logits = answer_logits(model, tokenizer, eval_rows, device)
    acc_after = accuracy(adapter_logits, eval_rows)
    print(f"accuracy after fine-tuning:  {acc_after:.3f}")
    report = sparsity_report(model)
    print(report.table())

    prune_sora(model)
    save_sora(model, out / "adapter")
    merge_report = merge_sora(model)
    print(merge_report.summary())
    merged_logits = answer_logits(model, tokenizer, eval_rows, device)
    agree = float((merged_logits.argmax(-1) == adapter_logits.argmax(-1)).float().mean())
    print(f"merged model: accuracy {accuracy(merged_logits, eval_rows):.3f}, answers equal to the adapter model's on {100 * agree:.1f}% "
          f"of reviews, max logit difference {float((merged_logits - adapter_logits).abs().max()):.2e}")
    for row in eval_rows[:3]:
        prompt = tokenizer(PROMPT.format(text=row["text"]), return_tensors="pt").to(device)
        generated = model.generate(**prompt, max_new_tokens=2, do_sample=False)
        reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :]).strip()
        print(f"  {row['text'][:70]!r:75} -> {reply!r} (truth: {row['label']})")
    summary = {"accuracy_before": acc_before, "accuracy_after": acc_after, "merged_agreement": agree, "sparsity": report.to_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'adapter'} and {out / 'summary.json'}")


if __name__ == "__main__":
    main()
