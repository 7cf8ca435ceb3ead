"""Data preparation and packing at the size users work at, side by side in one run.

    HF_HUB_OFFLINE=1 python benchmarks/data_pipeline.py [--rows 100000] [--small 25000] [--num-proc 2]
        [--train-steps 3] [--max-length 1024] [--micro-batch 8] [--quick] [--json out.json]

Data: chat conversations of 1-3 exchanges built from the 12,808 real Rotten Tomatoes critic
snippets (asset:rotten_tomatoes): the user quotes a review and asks about it, the assistant answers
with the verdict and a second review; seeded, so every run builds the same rows. Tokenizer and
chat template: SmolLM2-135M-Instruct's.

Measured, each variant in a fresh process (wall time; peak RSS growth over the process after its
imports and the tokenizer, its map workers included):

- ``baseline``: what any SFT script does at least: ``load_dataset("json")`` +
  ``Dataset.map(batched=True, num_proc)`` rendering the template and tokenizing, no labels;
- ``cold``: sora_dist's pipeline (``prepare_split``) with an empty cache: the same plus assistant
  masks, truncation, the label check and writing the cache;
- ``cached``: the same call again, which loads the tokenized set from the cache;
- the same at ``--small`` rows, to show that memory does not grow with the row count.

Then training throughput on SmolLM2 (fp32, gradient checkpointing, SoRA r=8 on every projection,
micro-batch 8, as sora-train runs each: padded batches with SDPA and the padding mask, packed rows
with the example-by-example attention of ``sora_dist.backends.varlen``): useful
(non-pad, labelled or not) tokens per second with packing into ``--max-length`` rows against random
micro-batches padded to their longest example.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = (
    "What did the critic think of this film?",
    "Is this review positive or negative?",
    "Would this critic recommend the movie?",
    "How would you sum up this review?",
)
FOLLOW_UPS = ("Can you give me another review like that?", "And what do other critics say?", "Anything else?")


def build_chats(rows: int, seed: int = 0) -> list[dict]:
    """Conversations of 1-3 exchanges from real review snippets (seeded)."""
    from sora_dist.data.assets import rotten_tomatoes_path

    reviews = [json.loads(line) for line in rotten_tomatoes_path().read_text().splitlines()]
    rng = random.Random(seed)
    chats = []
    for _ in range(rows):
        messages = []
        for turn in range(rng.choice((1, 1, 2, 3))):
            review, other = rng.choice(reviews), rng.choice(reviews)
            question = rng.choice(QUESTIONS) if turn == 0 else rng.choice(FOLLOW_UPS)
            messages.append({"role": "user", "content": f"{question}\n\nReview: {review['text']}"})
            verdict = "Positive" if review["label"] == "positive" else "Negative"
            messages.append({"role": "assistant", "content": f"{verdict}. The critic writes: \"{review['text']}\" Another critic: \"{other['text']}\""})
        chats.append({"messages": messages})
    return chats


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss() -> None:
    """Start VmHWM (the peak RSS) afresh from the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def peak_growth_mib(base: float) -> float:
    """Peak RSS since :func:`reset_peak_rss` over ``base``, of this process or of a map worker
    (forked children: their RSS counts the pages they share with this process)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return max(status_mib("VmHWM"), children) - base


def worker(variant: str, data: str, num_proc: int, max_length: int, cache: str) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    os.environ["SORA_DIST_DATA_CACHE"] = cache
    os.environ["HF_DATASETS_CACHE"] = str(Path(cache) / "hf")
    import datasets
    from transformers import AutoTokenizer

    from sora_dist.data import prepare_split
    from sora_dist.data.assets import smollm2_path

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    base = status_mib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    if variant == "baseline":

        def render(batch):
            texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
            return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)

        raw = datasets.load_dataset("json", data_files=data, split="train")
        out = raw.map(render, batched=True, num_proc=num_proc, remove_columns=raw.column_names, load_from_cache_file=False)
        rows, tokens = len(out), sum(len(ids) for ids in out["input_ids"])
    else:
        out = prepare_split([data], "data.train_file", tokenizer, "chat", max_length, on_error="skip", num_proc=num_proc)
        rows, tokens = len(out), sum(out.lengths)
    seconds = time.perf_counter() - start
    return {"variant": variant, "seconds": seconds, "rows": rows, "tokens": tokens, "rss_growth_mib": peak_growth_mib(base)}


def run_worker(args, variant: str, data: Path, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--data", str(data), "--num-proc", str(args.num_proc),
           "--max-length", str(args.max_length), "--cache", str(cache)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def throughput(args, data: Path) -> dict:
    """Useful tokens per second of SoRA training steps on SmolLM2, packed vs padded micro-batches."""
    import functools

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_param_groups
    from sora_dist.backends.varlen import NAME, use_varlen_attention
    from sora_dist.data import prepare_split
    from sora_dist.data.assets import smollm2_path
    from sora_dist.data.collate import pad_collate
    from sora_dist.data.packing import PackedExamples, collate_packed
    from sora_dist.training.loop import summed_token_loss

    torch.manual_seed(0)
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples = prepare_split([str(data)], "data.train_file", tokenizer, "chat", args.max_length, on_error="skip", num_proc=args.num_proc)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # 8 x 1024 fp32 fits in 24 GB
    inject_sora(model, SoRAConfig(r=8, alpha=16), verbose=False)
    optimizer = SoRAOptimizer(sora_param_groups(model, lr=1e-5, gate_lr=1e-3))
    model.train()
    packed = PackedExamples(examples, args.max_length)
    rng = random.Random(1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    use_varlen_attention(model)  # registers the implementation; each variant below picks its own
    sources = {  # padded: what a run without packing does (SDPA with the padding mask); packed: what sora-train runs
        "padded": (examples, functools.partial(pad_collate, pad_id=pad_id), "sdpa"),
        "packed": (packed, functools.partial(collate_packed, pad_id=pad_id), NAME),
    }
    results = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "useful": 0, "slots": 0} for name in sources}
    for step in range(args.train_steps + 1):  # step 0 warms up each variant
        for name, (rows, collate, attention) in sources.items():
            model.set_attn_implementation(attention)
            items = [rows[rng.randrange(len(rows))] for _ in range(args.micro_batch)]
            useful = sum(len(e["input_ids"]) for item in items for e in item.get("pack", [item]))
            batch = collate(items)
            start, cpu = time.perf_counter(), time.process_time()
            summed_token_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
            if step:
                results[name]["seconds"] += seconds
                results[name]["cpu_seconds"] += cpu_seconds
                results[name]["useful"] += useful
                results[name]["slots"] += batch["input_ids"].numel()
    for r in results.values():
        r["useful_tokens_per_s"] = r["useful"] / r["seconds"]
        r["useful_tokens_per_cpu_s"] = r["useful"] / r["cpu_seconds"]
        r["useful_fraction"] = r["useful"] / r["slots"]
    results["packed_fraction_of_dataset"] = packed.useful_fraction()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=25_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2,000 / 1,000 rows, 1 training step of 512 tokens")
    parser.add_argument("--only", choices=["preparation", "training"], help="run one of the two parts")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.num_proc, args.max_length, args.cache)))
        return
    if args.quick:
        args.rows, args.small, args.train_steps, args.max_length = 2000, 1000, 1, 512
    scratch = Path(tempfile.mkdtemp(prefix="sora-data-bench-"))
    try:
        chats = build_chats(args.rows)
        files = {}
        for n in (args.small, args.rows):
            files[n] = scratch / f"chats_{n}.jsonl"
            files[n].write_text("".join(json.dumps(c) + "\n" for c in chats[:n]))
        results = {}
        for n in (args.rows, args.small) if args.only != "training" else ():
            cache = scratch / f"cache_{n}"
            results[n] = {
                "baseline": run_worker(args, "baseline", files[n], cache),
                "cold": run_worker(args, "cold", files[n], cache),
                "cached": run_worker(args, "cached", files[n], cache),
            }
            shutil.rmtree(cache, ignore_errors=True)
        if args.only != "training":
            report_preparation(args, results)
        if args.train_steps and args.only != "preparation":
            results["training"] = throughput(args, files[args.small])
            report_training(args, results["training"])
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report_preparation(args, results: dict) -> None:
    big, small = results[args.rows], results[args.small]
    print(f"== data preparation: {args.rows:,} chats ({big['cold']['tokens']:,} tokens), SmolLM2 tokenizer, num_proc {args.num_proc}")
    print(f"{'variant':<10} {'rows':>9} {'seconds':>9} {'peak RSS growth MiB':>20}")
    for name in ("baseline", "cold", "cached"):
        r = big[name]
        print(f"{name:<10} {r['rows']:>9,} {r['seconds']:>9.2f} {r['rss_growth_mib']:>20.1f}")
    print(f"cold / baseline time: {big['cold']['seconds'] / big['baseline']['seconds']:.2f}x (target <= 1.5x)")
    print(f"cached / cold time: {100 * big['cached']['seconds'] / big['cold']['seconds']:.1f}% (target <= 5%)")
    print(f"cold / baseline peak RSS growth: {big['cold']['rss_growth_mib'] / max(big['baseline']['rss_growth_mib'], 1e-9):.2f}x (target <= 1.5x)")
    print(f"peak RSS growth {args.small:,} -> {args.rows:,} rows ({args.rows / args.small:.0f}x the rows): "
          f"ours {small['cold']['rss_growth_mib']:.1f} -> {big['cold']['rss_growth_mib']:.1f} MiB, "
          f"baseline {small['baseline']['rss_growth_mib']:.1f} -> {big['baseline']['rss_growth_mib']:.1f} MiB", flush=True)  # fmt: skip


def report_training(args, train: dict) -> None:
    print(f"== training throughput: SmolLM2 fp32 (gradient checkpointing), SoRA r=8, micro-batch {args.micro_batch}, {args.train_steps} timed steps each")
    for name in ("padded", "packed"):
        r = train[name]
        print(f"{name:<8} useful tokens per CPU-second {r['useful_tokens_per_cpu_s']:8.1f}, per second {r['useful_tokens_per_s']:8.1f}   "
              f"useful fraction of the batch {100 * r['useful_fraction']:.1f}%")  # fmt: skip
    cpu = train["packed"]["useful_tokens_per_cpu_s"] / train["padded"]["useful_tokens_per_cpu_s"]
    wall = train["packed"]["useful_tokens_per_s"] / train["padded"]["useful_tokens_per_s"]
    print(f"packed / padded useful tokens: {cpu:.2f}x per CPU-second, {wall:.2f}x per second (target >= 1.5x); "
          f"packing fills {100 * train['packed_fraction_of_dataset']:.1f}% of the rows")  # fmt: skip


if __name__ == "__main__":
    main()
