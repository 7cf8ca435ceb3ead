"""The SoRA optimizer as a wrapper around the inner optimizer users pick, measured side by side.

    HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu python benchmarks/optimizer.py [--parts overhead,offload,state]
        [--steps N] [--quick] [--json out.json]

(a) ``overhead``: SoRA with ``adamw_torch`` (the wrapper) vs PEFT LoRA with ``torch.optim.AdamW``,
    one training step on SmolLM2 fp32 (``step_time.py``'s setting: batch 4 x 256, r=8, all
    projections, 1 thread, round-robin), ratio of CPU-time medians (target <= 1.02x).
(b) ``offload``: ZeRO-3 with optimizer offload on 2 processes (gloo), SmolLM2, r=64 on every
    projection: time inside the optimizer step with DeepSpeed's CPU Adam (what ``adamw_torch``
    becomes under offload) vs torch's AdamW stepping the same offloaded fp32 shards in Python
    (target <= 0.5x).
(c) ``state``: optimizer-state bytes after one step with ``adamw_8bit`` vs ``adamw_torch`` for the
    same SmolLM2 adapter (r=64, all projections) (target <= 0.35x). bitsandbytes steps its 8-bit
    AdamW on the CPU here, so this runs without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overhead(args) -> dict:
    """step_time.py's sora and lora variants, in one run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step_time.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "step_time.py"), "--setting", "fp32", "--variants", "sora,lora",
               "--threads", "1", "--memory", "none", "--steps", str(args.steps), "--json", str(out)]  # fmt: skip
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"step_time.py failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())["results"][0]
    ratios = result["ratios"]["sora/lora"]
    return {"cpu_ratio": ratios["cpu_ratio_of_medians"], "wall_ratio": ratios["wall_ratio_of_medians"],
            "cpu_paired": ratios["cpu_paired_median"], "median_s": result["median_s"]}  # fmt: skip


def offload_worker(inner: str, steps: int, rank_r: int, out: str) -> None:
    """One ZeRO-3 + optimizer-offload run (started by torchrun): the time spent in SoRAOptimizer.step
    per optimizer step."""
    import torch

    from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora
    from sora_dist.backends import accelerate as engine
    from sora_dist.data.assets import smollm2_path
    from sora_dist.models import load_model
    from sora_dist.training import loop
    from sora_dist.training.config import TrainConfig

    if inner == "torch_adamw":  # what stepped the offloaded shards before: an Adam written in Python/torch ops
        loop.inner_optimizer = lambda name, offload=False: (torch.optim.AdamW, {})
    times = []
    original = SoRAOptimizer.step

    def timed(self, *a, **k):
        start = time.perf_counter()
        result = original(self, *a, **k)
        times.append(time.perf_counter() - start)
        return result

    SoRAOptimizer.step = timed
    ds_config = engine.load_ds_config(REPO / "ds_configs" / "zero3_offload.json")
    accelerator = engine.build_accelerator(ds_config, "no", 1)
    model = load_model(str(smollm2_path()), "causal_lm", torch.float32)
    torch.manual_seed(0)
    inject_sora(model, SoRAConfig(r=rank_r, alpha=2.0 * rank_r), verbose=False)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 49152, (32,), generator=g)} for _ in range(16)]
    config = TrainConfig(steps=steps, micro_batch_size=1, lr=1e-4, gate_lr=1e-2, lambda_start=0.1, log_every=0, seed=0)
    per_step = []

    def on_step(step, model, optimizer):  # ZeRO-3 calls step() once per parameter sub-group: sum them
        per_step.append(sum(times))
        times.clear()

    model, optimizer = loop.train(model, data, config, accelerator, on_step=on_step)
    inner_type = type(engine.client_optimizer(optimizer).inner).__name__
    if accelerator.is_main_process:
        Path(out).write_text(json.dumps({"step_s": per_step, "inner": inner_type}))
    engine.end_of_run()


def offload(args) -> dict:
    results = {}
    for inner in ("cpu_adam", "torch_adamw"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "times.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                   "--offload-worker", inner, "--steps", str(args.offload_steps), "--adapter-rank", str(args.r), "--out", str(out)]  # fmt: skip
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"offload worker ({inner}) failed:\n{proc.stderr[-4000:]}")
            got = json.loads(out.read_text())
        steps = got["step_s"][1:]  # the first step also allocates the state
        results[inner] = {"inner": got["inner"], "median_step_s": statistics.median(steps), "steps": steps}
    results["ratio"] = results["cpu_adam"]["median_step_s"] / results["torch_adamw"]["median_step_s"]
    return results


def state(args) -> dict:
    import torch

    from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_param_groups
    from sora_dist.backends.optimizers import inner_optimizer
    from sora_dist.data.assets import smollm2_path
    from sora_dist.models import load_model

    def bytes_after_one_step(name: str) -> tuple[int, int]:
        torch.manual_seed(0)
        model = load_model(str(smollm2_path()), "causal_lm", torch.float32)
        inject_sora(model, SoRAConfig(r=args.r, alpha=2.0 * args.r), verbose=False)
        inner, kwargs = inner_optimizer(name)
        optimizer = SoRAOptimizer(sora_param_groups(model, lr=1e-4, gate_lr=1e-2), lr=1e-4, inner=inner, **kwargs)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
        seen, total = set(), 0
        for values in optimizer.state.values():
            for value in values.values():
                if torch.is_tensor(value) and value.data_ptr() not in seen:
                    seen.add(value.data_ptr())
                    total += value.numel() * value.element_size()
        return total, sum(p.numel() for p in model.parameters() if p.requires_grad)

    fp32, params = bytes_after_one_step("adamw_torch")
    eight, _ = bytes_after_one_step("adamw_8bit")
    return {"adapter_params": params, "adamw_torch_bytes": fp32, "adamw_8bit_bytes": eight, "ratio": eight / fp32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="overhead,offload,state")
    parser.add_argument("--steps", type=int, default=10, help="(a) timed steps per variant")
    parser.add_argument("--offload-steps", type=int, default=4, help="(b) optimizer steps per run (the first is not timed)")
    parser.add_argument("--adapter-rank", dest="r", type=int, default=64, help="(b), (c) adapter rank")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--offload-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offload_worker:
        offload_worker(args.offload_worker, args.offload_steps, args.r, args.out)
        return
    if args.quick:
        args.steps, args.offload_steps, args.r = 3, 3, 16
    parts = args.parts.split(",")
    results = {}
    if "overhead" in parts:
        results["overhead"] = r = overhead(args)
        print(f"(a) wrapper overhead, SoRA (adamw_torch) / PEFT LoRA (torch AdamW), SmolLM2 fp32 step: "
              f"{r['cpu_ratio']:.3f}x CPU time ({r['wall_ratio']:.3f}x wall; paired median {r['cpu_paired']:.3f}x) (target <= 1.02x)", flush=True)  # fmt: skip
    if "offload" in parts:
        results["offload"] = r = offload(args)
        print(f"(b) ZeRO-3 + optimizer offload, 2 processes, r={args.r}: optimizer step {r['cpu_adam']['median_step_s'] * 1e3:.1f} ms "
              f"with {r['cpu_adam']['inner']} vs {r['torch_adamw']['median_step_s'] * 1e3:.1f} ms with {r['torch_adamw']['inner']}: "
              f"{r['ratio']:.2f}x (target <= 0.5x)", flush=True)  # fmt: skip
    if "state" in parts:
        results["state"] = r = state(args)
        print(f"(c) optimizer state, {r['adapter_params']:,} adapter parameters (r={args.r}): adamw_8bit {r['adamw_8bit_bytes'] / 2**20:.1f} MiB "
              f"vs adamw_torch {r['adamw_torch_bytes'] / 2**20:.1f} MiB: {r['ratio']:.3f}x (target <= 0.35x)", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
