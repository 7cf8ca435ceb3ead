"""Distributed costs of SoRA on 2 processes: per-rank model-state memory by ZeRO stage, SoRA/LoRA step time.

    python benchmarks/distributed.py [--steps 30] [--repeats 2]

Runs the same worker as the distributed tests (tests/dist_worker.py, started with torchrun) on a
small Llama built from a config (4 layers, hidden 256, vocab 4096, ~5.5M parameters) with SoRA of
rank 8 on every linear layer:

- memory: bytes each rank holds for parameters (frozen base included), fp32 master copies and
  optimizer state after training (fp32, ZeRO-0/2/3), each storage counted once. ZeRO-0 keeps
  everything on every rank; ZeRO-3 shards the base too. Target: ZeRO-3 <= 0.55 x ZeRO-0.
- time: median optimizer-step time under ZeRO-2 (bf16) for SoRA and for LoRA (the same adapters with
  the gates frozen at 1 and no gate group), alternating runs. Reported as CPU time per step (what
  the processes themselves spent, insensitive to other jobs on a shared machine) and wall-clock
  time (what a dedicated machine would show; noisy on a shared one). Target: SoRA / LoRA <= 1.03.

On a machine without a GPU this runs on the CPU over gloo (as the tests do); with GPUs it needs two
(one per process). Printed figures are what this machine measured; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
MB = 2**20


def make_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)


def launch(model: Path, out: Path, *args: str) -> list[dict]:
    """Run the worker on 2 processes; returns each rank's facts."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    cmd += ["--model", str(model), "--out", str(out), "--adapter-rank", "8", "--seq-len", "128", "--micro-batch-size", "4", "--grad-accum", "1", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker failed ({' '.join(args)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def memory_table(model: Path, work: Path) -> dict[str, dict]:
    per_stage = {}
    for stage in ("zero0", "zero2", "zero3"):
        facts = launch(model, work / f"mem_{stage}", "--backend", stage, "--steps", "2", "--log-every", "0")
        per_stage[stage] = max((f["memory"] for f in facts), key=lambda m: m["total"])
    base = per_stage["zero0"]["total"]
    print("\nper-rank model state, 2 ranks, fp32 (largest rank)")
    print(f"{'stage':<6} {'params MB':>10} {'fp32 master MB':>15} {'optim state MB':>15} {'total MB':>9} {'vs ZeRO-0':>10}")
    for stage, m in per_stage.items():
        print(
            f"{stage:<6} {m['params'] / MB:>10.2f} {m['master_params'] / MB:>15.2f} {m['optimizer_state'] / MB:>15.2f} "
            f"{m['total'] / MB:>9.2f} {m['total'] / base:>10.3f}"
        )
    return per_stage


def step_times(model: Path, work: Path, steps: int, repeats: int) -> dict[str, dict[str, list[list[float]]]]:
    """Per run, wall-clock and CPU seconds of each step after warm-up (slowest rank per step)."""
    common = ("--backend", "zero2", "--mixed-precision", "bf16", "--steps", str(steps), "--log-every", "0")
    warmup = min(5, steps // 3)
    runs = {name: {"step_times": [], "cpu_times": []} for name in ("SoRA", "LoRA")}
    for i in range(repeats):
        for name, extra in (("SoRA", ()), ("LoRA", ("--lora",))):
            facts = launch(model, work / f"time_{name}_{i}", *common, *extra)
            for kind, per_run in runs[name].items():
                per_run.append([max(ts) for ts in zip(*(f[kind][warmup:] for f in facts))])
    return runs


def median_ms(per_run: list[list[float]]) -> float:
    return 1000 * statistics.median(t for times in per_run for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sora_bench_") as tmp:
        work = Path(tmp)
        model = work / "model"
        make_model(model)
        per_stage = memory_table(model, work)
        ratio = per_stage["zero3"]["total"] / per_stage["zero0"]["total"]
        runs = step_times(model, work, args.steps, args.repeats)
    print("\nZeRO-2, bf16, 2 ranks: median per run, wall-clock ms | CPU ms of the slowest rank")
    for name, kinds in runs.items():
        cells = [f"{1000 * statistics.median(w):.1f} | {1000 * statistics.median(c):.1f}" for w, c in zip(kinds["step_times"], kinds["cpu_times"])]
        print(f"{name}: " + ", ".join(cells))
    wall = median_ms(runs["SoRA"]["step_times"]) / median_ms(runs["LoRA"]["step_times"])
    cpu = median_ms(runs["SoRA"]["cpu_times"]) / median_ms(runs["LoRA"]["cpu_times"])
    print(f"ZeRO-3 / ZeRO-0 per-rank model state: {ratio:.3f} (target <= 0.55)")
    print(f"step time SoRA / LoRA under ZeRO-2: {cpu:.3f} in CPU time, {wall:.3f} wall-clock (target <= 1.03)")


if __name__ == "__main__":
    main()
