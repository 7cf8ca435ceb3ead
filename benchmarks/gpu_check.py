"""One command that checks the CUDA paths of sora_dist on the first GPU it meets (a reduced form runs on CPU).

    python benchmarks/gpu_check.py [--device cuda|cpu] [--json gpu_check.json]

Every check compares with an independent computation and prints one row (pass / FAIL / skipped,
with its numbers); the JSON holds the same. On a GPU it takes a few minutes; ``--device cpu`` runs
every check in a smaller form (tiny models), which CI runs so that the script itself is tested.

1. bnb 4-bit layer: a SoRA layer on a bitsandbytes nf4 base, forward and backward, against the same
   adapter on a dense layer holding the dequantized weight.
2. QLoRA run: SoRA on a 4-bit base (SmolLM2-135M-Instruct on a GPU when installed, a tiny Llama on
   CPU), bf16, 30 steps (CPU: 12): the loss falls, gates reach exact zeros, pruning keeps the
   logits exactly, and merging into the dequantized base keeps them within bf16 rounding.
3. DeepSpeed ZeRO-2 and ZeRO-3 in a world of one process (NCCL on a GPU, gloo on CPU) against the
   plain run (tests/dist_worker.py).
4. Packing: the loss of packed rows equals the loss of the same examples unpacked, with
   flash-attention 2 when installed on a GPU, else with sora_dist's example-by-example attention.
5. Chunked loss against the loss from full logits: value and gradients, and the peak memory of the
   loss on a large vocabulary.
6. Step time and peak memory of a training step, SoRA against PEFT LoRA (information, no target).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sora_dist.data.formats import IGNORE  # noqa: E402

RESULTS: list[dict] = []


def record(name: str, passed: bool | None, detail: str, **numbers) -> None:
    status = "skipped" if passed is None else "pass" if passed else "FAIL"
    RESULTS.append({"check": name, "status": status, "detail": detail, **numbers})
    print(f"{status:>7}  {name:<22} {detail}", flush=True)


def tiny_llama(vocab: int = 256, hidden: int = 64, layers: int = 2, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **extra)  # fmt: skip
    return LlamaForCausalLM(config).float()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


# --- 1 ---------------------------------------------------------------------------------------------


def check_bnb_layer(device: torch.device) -> None:
    from torch import nn

    from sora_dist.backends.bnb import dequantized_weight, make_linear4bit
    from sora_dist.core.layer import SoRALinear

    torch.manual_seed(0)
    dense = torch.randn(96, 128, device=device) * 0.05
    base = make_linear4bit(dense, None, "nf4", torch.bfloat16)
    reference = nn.Linear(128, 96, bias=False, device=device)
    with torch.no_grad():
        reference.weight.copy_(dequantized_weight(base).to(device))
    quantized, plain = SoRALinear(base, 8, alpha=16.0), SoRALinear(reference, 8, alpha=16.0)
    with torch.no_grad():
        for layer in (quantized, plain):
            layer.to(device)
        plain.lora_A.copy_(quantized.lora_A)
        plain.lora_B.copy_(torch.randn_like(plain.lora_B) * 0.1)
        quantized.lora_B.copy_(plain.lora_B)
        plain.gate.copy_(quantized.gate)
    x = torch.randn(4, 16, 128, device=device)
    grads = []
    outs = []
    for layer in (quantized, plain):
        xi = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().mean().backward()
        outs.append(y.detach())
        grads.append([xi.grad, layer.lora_A.grad, layer.lora_B.grad, layer.gate.grad])
    err_out = max_rel(outs[0], outs[1])
    err_grad = max(max_rel(a, b) for a, b in zip(*grads))
    nonzero = all(float(g.abs().sum()) > 0 for g in grads[0])
    record("bnb 4-bit layer", err_out < 0.02 and err_grad < 0.05 and nonzero,
           f"output rel err {err_out:.2e}, gradients rel err {err_grad:.2e}, every gradient non-zero: {nonzero}",
           output_rel_err=err_out, grad_rel_err=err_grad)  # fmt: skip


# --- 2 ---------------------------------------------------------------------------------------------


def qlora_model(device: torch.device, full: bool):
    """(model path or None, 4-bit model) : SmolLM2 on a GPU when installed, else a tiny Llama."""
    from sora_dist.models import load_model

    path = None
    if full:
        try:
            from sora_dist.data.assets import smollm2_path

            path = str(smollm2_path())
        except ModuleNotFoundError:
            path = None
    if path is None:
        path = tempfile.mkdtemp(prefix="gpu_check_model_")
        tiny_llama(vocab=256, hidden=64).save_pretrained(path)
    return path, load_model(path, "causal_lm", torch.bfloat16, "4bit", compute_dtype=torch.bfloat16)


def check_qlora_run(device: torch.device, full: bool) -> None:
    from sora_dist import SoRAConfig, inject_sora, sora_modules
    from sora_dist.backends.accelerate import build_accelerator
    from sora_dist.core.merge import merge_sora
    from sora_dist.core.prune import prune_sora
    from sora_dist.data.collate import pad_collate
    from sora_dist.training.config import TrainConfig
    from sora_dist.training.loop import train

    steps = 30 if full else 12
    path, model = qlora_model(device, full)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(64):  # x[t+1] = (a x[t] + b) mod 97 + 3: learnable sequences
        a, b, x = (int(v) for v in torch.randint(1, 97, (3,), generator=g))
        seq = [x]
        for _ in range(31):
            seq.append((a * seq[-1] + b) % 97 + 3)
        rows.append({"input_ids": seq, "labels": seq})
    torch.manual_seed(1)
    inject_sora(model, SoRAConfig(r=8, alpha=16, dropout=0.0), verbose=False)
    accelerator = build_accelerator(None, "bf16", 1)
    config = TrainConfig(steps=steps, micro_batch_size=8, lr=2e-3 if full else 2e-2, gate_lr=0.05, lambda_start=1.5, log_every=0, seed=0, lr_decay="constant")
    losses: list[float] = []
    probe = torch.tensor([rows[0]["input_ids"]], device=accelerator.device)

    def on_step(step, m, optimizer):
        with torch.no_grad(), accelerator.autocast():
            losses.append(float(m(input_ids=probe, labels=probe).loss))

    model, _ = train(model, rows, config, accelerator, on_step=on_step, collate_fn=lambda b: pad_collate(b, pad_id=0))
    model = accelerator.unwrap_model(model).eval()
    gates = [m.gate.detach() for _, m in sora_modules(model)]
    zeros, total = sum(int((g == 0).sum()) for g in gates), sum(g.numel() for g in gates)
    with torch.no_grad(), accelerator.autocast():
        before = model(input_ids=probe).logits.float()
        prune_sora(model)
        pruned = model(input_ids=probe).logits.float()
        merge_sora(model, dtype=torch.bfloat16)
        merged = model(input_ids=probe).logits.float()
    prune_err, merge_err = max_rel(pruned, before), max_rel(merged, before)
    fell = losses[-1] < (0.9 if full else 0.98) * losses[0]  # the same probe sequence every step: any fall is real
    ok = fell and 0 < zeros < total and prune_err == 0.0 and merge_err < 0.05
    record("QLoRA SoRA run", ok, f"{Path(path).name if full else 'tiny Llama'}, {steps} steps: probe loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
           f"{zeros}/{total} gates exactly 0, pruned logits err {prune_err:.1e}, merged (bf16) {merge_err:.2e}",
           loss_first=losses[0], loss_last=losses[-1], zero_gates=zeros, gates=total, prune_err=prune_err, merge_err=merge_err)  # fmt: skip
    accelerator.free_memory()


# --- 3 ---------------------------------------------------------------------------------------------


def run_worker(model_dir: str, out: Path, backend: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    worker = [str(REPO / "tests" / "dist_worker.py"), "--model", model_dir, "--out", str(out), "--backend", backend, "--micro-batch-size", "4"]
    cmd = [sys.executable, *worker] if backend == "single" else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *worker]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} worker failed:\n{proc.stderr[-3000:]}")
    from safetensors.torch import load_file

    return load_file(str(out / "rank0.safetensors"))


def check_zero_world_of_one(device: torch.device) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu_check_zero_") as tmp:
        model_dir = Path(tmp) / "model"
        tiny_llama(vocab=128, hidden=32, pad_token_id=None).save_pretrained(model_dir)
        plain = run_worker(str(model_dir), Path(tmp) / "single", "single")
        for backend in ("zero2", "zero3"):
            got = run_worker(str(model_dir), Path(tmp) / backend, backend)
            worst = max(float((got[k] - plain[k]).abs().max()) for k in plain)
            mismatch = sum(int(((got[k] == 0) != (plain[k] == 0)).sum()) for k in plain if k.endswith(".gate"))
            record(f"DeepSpeed {backend}", worst <= 1e-4 and mismatch == 0,
                   f"world of one vs plain: max |difference| {worst:.1e}, gate zero-pattern mismatches {mismatch}",
                   max_abs_diff=worst)  # fmt: skip


# --- 4 ---------------------------------------------------------------------------------------------


def check_packing(device: torch.device) -> None:
    from sora_dist.backends.varlen import use_varlen_attention
    from sora_dist.training.loop import token_losses

    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    dtype = torch.bfloat16 if flash else torch.float32
    model = tiny_llama(vocab=256, hidden=64, seed=2).to(device, dtype)
    if flash:
        model.set_attn_implementation("flash_attention_2")
    else:
        use_varlen_attention(model)
    g = torch.Generator().manual_seed(4)
    examples = [torch.randint(1, 256, (int(n),), generator=g) for n in (17, 9, 30, 12)]
    separate = sum(float(token_losses(model(input_ids=e[None].to(device)).logits, e[None].to(device))) for e in examples)
    ids = torch.cat(examples)[None].to(device)
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None].to(device)
    labels = ids.clone()
    start = 0
    for e in examples:
        labels[0, start] = IGNORE if start else labels[0, start]  # no target crosses into the next example
        start += len(e)
    packed = float(token_losses(model(input_ids=ids, position_ids=positions).logits, labels))
    rel = abs(packed - separate) / abs(separate)
    tolerance = 2e-2 if flash else 1e-5
    record("packing", rel < tolerance, f"{'flash-attention 2' if flash else 'sora_varlen (SDPA per example)'}: packed loss {packed:.5f}, "
           f"unpacked {separate:.5f}, rel diff {rel:.1e}", rel_diff=rel)  # fmt: skip


# --- 5 ---------------------------------------------------------------------------------------------


def peak_of(fn, device: torch.device) -> tuple[object, int]:
    """(fn's result, peak bytes of tensors it allocated)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    live = peak = 0
    for event in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU):  # fmt: skip
        live += event[1]
        peak = max(peak, live)
    return result, peak


def check_chunked_loss(device: torch.device, full: bool) -> None:
    from sora_dist import SoRAConfig, inject_sora
    from sora_dist.training.chunked_loss import row_token_losses
    from sora_dist.training.loop import token_losses

    vocab, seq = (131072, 2048) if full else (32768, 256)
    model = tiny_llama(vocab=vocab, hidden=64, layers=1, seed=3).to(device)
    torch.manual_seed(5)
    inject_sora(model, SoRAConfig(r=4, alpha=8, dropout=0.0), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(6)).to(device)
    batch = {"input_ids": ids, "labels": ids}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(chunk):
        def run():
            loss = row_token_losses(model, batch, chunk, token_losses).sum() / (2 * (seq - 1))
            return loss.detach(), torch.autograd.grad(loss, trainable)

        return peak_of(run, device)

    (plain, plain_grads), plain_peak = loss_and_grads(0)
    (chunked, chunked_grads), chunked_peak = loss_and_grads(None if full else 128)  # the reduced form: several chunks too
    loss_err = abs(float(chunked - plain)) / abs(float(plain))
    grad_err = max(max_rel(a, b) for a, b in zip(chunked_grads, plain_grads))
    ratio = chunked_peak / plain_peak
    record("chunked loss", loss_err < 1e-5 and grad_err < 1e-4 and ratio < 0.5,
           f"vocab {vocab:,} x {2 * seq:,} tokens: loss rel err {loss_err:.1e}, grads {grad_err:.1e}; peak {chunked_peak / 2**20:.0f} MB "
           f"vs {plain_peak / 2**20:.0f} MB from full logits ({ratio:.2f}x)",
           loss_rel_err=loss_err, grad_rel_err=grad_err, peak_chunked=chunked_peak, peak_logits=plain_peak)  # fmt: skip


# --- 6 ---------------------------------------------------------------------------------------------


def check_step_vs_peft(device: torch.device, full: bool) -> None:
    if importlib.util.find_spec("peft") is None:
        record("step vs PEFT LoRA", None, "peft is not installed")
        return
    from peft import LoraConfig, get_peft_model

    from sora_dist import SoRAConfig, inject_sora
    from sora_dist.training.config import TrainConfig
    from sora_dist.training.loop import build_optimizer, summed_token_loss

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    path = None
    if full:
        try:
            from sora_dist.data.assets import smollm2_path

            path = smollm2_path()
        except ModuleNotFoundError:
            path = None
    seq, steps = (1024, 6) if full else (128, 3)

    def fresh():
        if path is not None:
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
        return tiny_llama(vocab=4096, hidden=128, layers=2, seed=7).to(device)

    ids = torch.randint(0, 4096, (4, seq), generator=torch.Generator().manual_seed(8)).to(device)

    def measure(arm: str) -> tuple[float, int]:
        model = fresh()
        if arm == "peft":
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        else:
            inject_sora(model, SoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=targets), verbose=False)
            optimizer = build_optimizer(model, TrainConfig(steps=1, lr=1e-4, lambda_start=0.1))

        def one() -> None:
            if arm == "peft":
                model(input_ids=ids, labels=ids).loss.backward()
            else:
                (summed_token_loss(model, {"input_ids": ids, "labels": ids}) / ids[:, 1:].numel()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        one()  # warm-up: optimizer state exists from here
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            one()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        _, peak = peak_of(one, device)
        return sorted(times)[len(times) // 2], peak

    figures = {arm: measure(arm) for arm in ("sora", "peft")}
    time_ratio, mem_ratio = figures["sora"][0] / figures["peft"][0], figures["sora"][1] / figures["peft"][1]
    record("step vs PEFT LoRA", True, f"{'SmolLM2' if path else 'tiny Llama'}, 4 x {seq} tokens: step {1000 * figures['sora'][0]:.0f} ms vs "
           f"{1000 * figures['peft'][0]:.0f} ms ({time_ratio:.2f}x), peak {figures['sora'][1] / 2**20:.0f} MB vs {figures['peft'][1] / 2**20:.0f} MB "
           f"({mem_ratio:.2f}x)", time_ratio=time_ratio, memory_ratio=mem_ratio)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--only", help="comma-separated check numbers (1-6)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA GPU here (use --device cpu for the reduced checks)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    full = device.type == "cuda"
    where = torch.cuda.get_device_name(0) if full else "CPU (reduced checks)"
    print(f"sora_dist GPU check on {where}; torch {torch.__version__}", flush=True)
    checks = {
        "1": lambda: check_bnb_layer(device),
        "2": lambda: check_qlora_run(device, full),
        "3": lambda: check_zero_world_of_one(device),
        "4": lambda: check_packing(device),
        "5": lambda: check_chunked_loss(device, full),
        "6": lambda: check_step_vs_peft(device, full),
    }
    wanted = args.only.split(",") if args.only else list(checks)
    start = time.perf_counter()
    for key in wanted:
        before = len(RESULTS)
        try:
            checks[key]()
        except Exception as err:  # one failing check must not hide the others
            traceback.print_exc()
            if len(RESULTS) == before:
                record(f"check {key}", False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    failed = [r for r in RESULTS if r["status"] == "FAIL"]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks did not fail ({time.perf_counter() - start:.0f} s) on {where}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "torch": torch.__version__, "results": RESULTS}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
