"""FSDP2 against DeepSpeed ZeRO-2 and ZeRO-3 for SoRA: step time and per-rank memory, same model and batch.

    python benchmarks/engines.py [--steps 20] [--repeats 2] [--processes 2,4]

Runs the distributed tests' worker (tests/dist_worker.py under torchrun) on the small Llama of
benchmarks/distributed.py (4 layers, hidden 256, vocab 4096, ~5.5M parameters), SoRA of rank 8 on
every linear layer, 4 sequences of 128 tokens per rank and step, fp32:

- memory: bytes the largest rank holds after training for parameters (frozen base included), fp32
  master copies, and optimizer state, each storage counted once; and the optimizer state per rank
  against one process's (target for FSDP2: ~1/N at N processes).
- time: median optimizer-step time per engine at 2 processes, runs interleaved, as CPU time of the
  slowest rank (robust to other jobs on a shared machine) and wall-clock.

Without a GPU everything runs on the CPU over gloo (2 cores here: 4 processes share them, so time
is only compared at 2). On a machine with GPUs the same command runs each engine on the GPUs (one
per process, NCCL); pass ``--processes`` up to the GPU count. Nothing printed is hard-coded.
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
sys.path.insert(0, str(REPO / "benchmarks"))
from distributed import make_model  # noqa: E402

WORKER = REPO / "tests" / "dist_worker.py"
ENGINES = ("fsdp2", "zero2", "zero3")
MB = 2**20


def launch(model: Path, out: Path, processes: int, *args: str) -> list[dict]:
    """The worker on ``processes`` processes; each rank's facts."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), str(WORKER)]
    cmd += ["--model", str(model), "--out", str(out), "--adapter-rank", "8", "--seq-len", "128", "--grad-accum", "1", "--log-every", "0", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker failed ({processes} processes, {' '.join(args)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def largest(facts: list[dict]) -> dict:
    return max((f["memory"] for f in facts), key=lambda m: m["total"])


def memory(model: Path, work: Path, counts: list[int]) -> None:
    # One process with the whole global batch (4 x 4 sequences): the state every rank would hold without sharding.
    alone = largest(launch(model, work / "mem_one", 1, "--backend", "single", "--steps", "2", "--micro-batch-size", "16"))
    print(f"\nper-rank model state, fp32, global batch 16 x 128 tokens (largest rank); one process: {alone['total'] / MB:.2f} MB, "
          f"optimizer state {alone['optimizer_state'] / MB:.3f} MB")  # fmt: skip
    print(f"{'engine':<7} {'N':>2} {'params MB':>10} {'master MB':>10} {'optim MB':>9} {'total MB':>9} {'optim x N / one':>16}")
    for n in counts:
        for engine in ENGINES:
            m = largest(launch(model, work / f"mem_{engine}_{n}", n, "--backend", engine, "--steps", "2", "--micro-batch-size", str(16 // n)))
            print(f"{engine:<7} {n:>2} {m['params'] / MB:>10.2f} {m['master_params'] / MB:>10.2f} {m['optimizer_state'] / MB:>9.3f} "
                  f"{m['total'] / MB:>9.2f} {m['optimizer_state'] * n / alone['optimizer_state']:>16.3f}")  # fmt: skip


def step_times(model: Path, work: Path, steps: int, repeats: int) -> None:
    warmup = min(5, steps // 3)
    runs: dict[str, dict[str, list[float]]] = {e: {"step_times": [], "cpu_times": []} for e in ENGINES}
    for i in range(repeats):
        for engine in ENGINES:
            facts = launch(model, work / f"time_{engine}_{i}", 2, "--backend", engine, "--steps", str(steps), "--micro-batch-size", "4")
            for kind, values in runs[engine].items():
                values.extend(max(ts) for ts in zip(*(f[kind][warmup:] for f in facts)))
    print(f"\nstep time, 2 processes, fp32, 4 x 128 tokens per rank, median over {repeats} interleaved runs of {steps - warmup} steps")
    print(f"{'engine':<7} {'CPU ms':>8} {'wall ms':>8} {'CPU vs zero2':>13} {'wall vs zero2':>14}")
    ref = {kind: statistics.median(runs["zero2"][kind]) for kind in ("step_times", "cpu_times")}
    for engine, kinds in runs.items():
        cpu, wall = statistics.median(kinds["cpu_times"]), statistics.median(kinds["step_times"])
        print(f"{engine:<7} {1000 * cpu:>8.1f} {1000 * wall:>8.1f} {cpu / ref['cpu_times']:>13.3f} {wall / ref['step_times']:>14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes", default="2,4", help="process counts for the memory table (each must divide 16)")
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    if any(16 % n for n in counts):
        sys.exit("--processes: each count must divide the global batch of 16")
    with tempfile.TemporaryDirectory(prefix="sora_engines_") as tmp:
        work = Path(tmp)
        make_model(work / "model")
        memory(work / "model", work, counts)
        step_times(work / "model", work, args.steps, args.repeats)


if __name__ == "__main__":
    main()
