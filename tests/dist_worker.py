"""One training run for the distributed tests, started by torchrun (or plain python for 1 process).

Every rank writes what it sees to ``--out``: ``rank<r>.safetensors`` (the full adapter tensors,
gathered under ZeRO-3) and ``rank<r>.json`` (backend facts, collective counts per step, memory).
The final adapter goes through ``save_sora`` into ``--out/train/adapter``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BACKENDS = {
    "single": None,
    "ddp": None,
    "zero0": "zero0.json",
    "zero1": "zero1.json",
    "zero2": "zero2.json",
    "zero3": "zero3.json",
    "zero3_offload": "zero3_offload.json",
    "zero3_4bit": "zero3_4bit.json",
    "fsdp2": None,
    "fsdp2_4bit": None,
    "single_4bit": None,
}
# What `accelerate launch --config_file launch/fsdp2.yaml` exports (its fsdp_config), for torchrun here.
FSDP2_ENV = {
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
}  # fmt: skip
SEED = 7
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
    "all_gather_single", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
    "gather", "scatter", "send", "recv", "isend", "irecv", "barrier",
)  # fmt: skip


class CollectiveCounter:
    """Records torch.distributed calls (outermost only) as (name, elements moved) while ``active``."""

    def __init__(self):
        self.active = False
        self.calls: list[tuple[str, int]] = []
        self.in_optimizer_step = 0
        self._inside_step = False
        self._depth = 0

    def install(self) -> None:
        # Before DeepSpeed starts: its comm backend caches some of these functions at init.
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active and self._depth == 0:
                self.in_optimizer_step += self._inside_step
                self.calls.append((name, sum(a.numel() for a in (*args, *kwargs.values()) if torch.is_tensor(a))))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def watch_step(self, optimizer) -> None:
        """Also count the calls made inside ``optimizer.step()`` (SoRA's update must make none)."""
        step = optimizer.step

        def watched(*args, **kwargs):
            self._inside_step = True
            try:
                return step(*args, **kwargs)
            finally:
                self._inside_step = False

        optimizer.step = watched

    def take(self) -> dict:
        taken = {"calls": self.calls, "in_optimizer_step": self.in_optimizer_step}
        self.calls, self.in_optimizer_step = [], 0
        return taken


def token_data(n: int = 48, seq_len: int = 16, vocab: int = 128, seed: int = 1234) -> list[dict]:
    """Sequences that follow x[t+1] = (a x[t] + b) mod vocab: learnable, deterministic."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        a, b, x = (int(v) for v in torch.randint(1, vocab, (3,), generator=g))
        seq = [x]
        for _ in range(seq_len - 1):
            seq.append((a * seq[-1] + b) % vocab)
        data.append({"input_ids": torch.tensor(seq)})
    return data


def variable_data(n: int = 48, shortest: int = 4, longest: int = 32, vocab: int = 128, seed: int = 4321) -> list[dict]:
    """Sequences of the token_data pattern whose lengths differ up to 8x (shortest..longest)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g).tolist()
    lengths[:2] = [shortest, longest]
    data = []
    for length in lengths:
        a, b, x = (int(v) for v in torch.randint(1, vocab, (3,), generator=g))
        seq = [x]
        for _ in range(length - 1):
            seq.append((a * seq[-1] + b) % vocab)
        data.append({"input_ids": seq, "labels": seq})
    return data


def randomize_b(model, seed: int = 99) -> None:
    """Non-zero B in every SoRA module (B starts at 0), so that A and the gates get gradients too."""
    from sora_dist import sora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sora_modules(model):
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.05)


def record_first_gradients(model, names: dict[int, str], store: dict) -> None:
    """Keep the full gradient of every trainable parameter as the first optimizer step receives it.

    DeepSpeed: after the last backward of the step, before the engine steps (``safe_get_full_grad``
    gathers a ZeRO shard; every rank calls it). Elsewhere: at ``SoRAOptimizer.step()``.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    from sora_dist import SoRAOptimizer

    def keep(grad_of) -> None:
        if not store:
            for param in model.parameters():
                if id(param) in names:
                    store[names[id(param)]] = grad_of(param).detach().float().cpu().clone()

    engine_step, optimizer_step = DeepSpeedEngine.step, SoRAOptimizer.step

    def step_engine(self, *args, **kwargs):
        if self.is_gradient_accumulation_boundary():
            keep(safe_get_full_grad)
        return engine_step(self, *args, **kwargs)

    def step_optimizer(self, *args, **kwargs):
        if any(id(p) in names for group in self.param_groups for p in group["params"]):  # not ZeRO shards
            keep(lambda param: param.grad)
        return optimizer_step(self, *args, **kwargs)

    DeepSpeedEngine.step, SoRAOptimizer.step = step_engine, step_optimizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", choices=BACKENDS, required=True)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--gate-lr", type=float, default=0.1)
    p.add_argument("--lambda", dest="lambda_", type=float, default=2.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--adapter-rank", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--crash-in-save", type=int, default=0, help="all ranks die (os._exit) while writing this step's checkpoint")
    p.add_argument("--count-collectives", action="store_true")
    p.add_argument("--zero-option", action="append", default=[], help="KEY=INT: override zero_optimization.KEY")
    p.add_argument("--lora", action="store_true", help="baseline: gates frozen at 1, no gate group (plain LoRA)")
    p.add_argument("--variable-lengths", action="store_true", help="train on variable_data() (lengths 4..32), padded per micro-batch")
    p.add_argument("--record-grads", action="store_true", help="write the first step's gradients to rank<r>_grads.safetensors")
    p.add_argument("--normalize-factors", action="store_true", help="train.normalize_factors: move each rank's scale into its gate")
    p.add_argument("--gate-l1", type=float, default=0.0, help="train.gate_l1: the L1 term of the released code")
    p.add_argument("--gate-update", default="prox_adam", help="train.gate_update: prox_adam | prox_sgd")
    p.add_argument("--threshold", default="lr_scaled", help="train.threshold: lr_scaled | fixed")
    p.add_argument("--save-adapter-at", type=int, default=0, help="also save the adapter (save_sora) to --out/adapter-<step> after this step")
    p.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing (transformers' own, RNG preserved)")
    p.add_argument("--loss-chunk-tokens", type=int, default=None, help="train.loss_chunk_tokens (0: the loss from full logits)")
    p.add_argument("--budget", type=float, default=0.0, help="budget mode: this many live ranks by the last step (lambda_max 4)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    counter = CollectiveCounter()
    if args.count_collectives:
        counter.install()
    from helpers import model_state_bytes
    from safetensors.torch import save_file

    from sora_dist import SoRAConfig, inject_sora, sora_modules
    from sora_dist.backends import accelerate as engine
    from sora_dist.data.collate import pad_collate, stack_collate
    from sora_dist.deploy.io import adapter_state
    from sora_dist.models import load_model
    from sora_dist.training.config import TrainConfig
    from sora_dist.training.loop import gate_shard_numel, train

    if args.backend.startswith("fsdp2"):
        os.environ.update(FSDP2_ENV)
    ds_config = BACKENDS[args.backend] and engine.load_ds_config(REPO / "ds_configs" / BACKENDS[args.backend])
    for option in args.zero_option:
        key, value = option.split("=")
        ds_config["zero_optimization"][key] = int(value)
    accelerator = engine.build_accelerator(ds_config, args.mixed_precision, args.grad_accum)
    rank, world = accelerator.process_index, accelerator.num_processes
    four_bit = args.backend.endswith("_4bit")
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    model = load_model(args.model, "causal_lm", dtype, "4bit" if four_bit else "none", compute_dtype=dtype)
    q_proj = model.model.layers[0].self_attn.q_proj
    facts = {
        "rank": rank,
        "world_size": world,
        "backend": engine.backend_name(accelerator),
        "base_partitioned_at_load": hasattr(q_proj.weight, "ds_id"),
        "base_local_numel_at_load": q_proj.weight.data.numel(),
        "base_is_4bit": type(q_proj).__name__ == "Linear4bit",
    }
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(SEED)
    inject_sora(model, SoRAConfig(r=args.adapter_rank, alpha=2.0 * args.adapter_rank, dropout=args.dropout), verbose=False)
    if args.lora:
        for _, module in sora_modules(model):
            module.gate.data.fill_(1.0)
            module.gate.requires_grad_(False)
    if args.record_grads:
        randomize_b(model)
    initial_gates = {name: m.gate.detach().clone() for name, m in sora_modules(model)}
    config = TrainConfig(
        steps=args.steps,
        micro_batch_size=args.micro_batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        gate_lr=args.gate_lr,
        lambda_start=args.lambda_,
        max_grad_norm=args.max_grad_norm,
        normalize_factors=args.normalize_factors,
        gate_l1=args.gate_l1,
        gate_update=args.gate_update,
        loss_chunk_tokens=args.loss_chunk_tokens,
        threshold=args.threshold,
        seed=SEED,
        output_dir=str(Path(args.out) / "train"),
        save_every=args.save_every,
        log_every=0 if args.count_collectives else args.log_every,
    )
    per_step, step_times, cpu_times, tick = [], [], [], [time.perf_counter(), time.process_time()]

    def on_step(step, model, optimizer):
        if step == args.save_adapter_at:
            from sora_dist.deploy.io import save_sora

            save_sora(accelerator.unwrap_model(model), Path(args.out) / f"adapter-{step}")
        if args.count_collectives:
            per_step.append(counter.take())
            if step == 1:
                counter.watch_step(engine.client_optimizer(optimizer))
        if step == 1:
            base = accelerator.unwrap_model(model).model.layers[0].self_attn.q_proj.base
            facts["base_local_numel_in_training"] = base.weight.data.numel()
            facts["base_shard_numel_in_training"] = getattr(base.weight, "ds_tensor", base.weight).numel()
            if hasattr(base.weight, "to_local"):  # FSDP2: this rank's block of rows
                facts["base_shard_numel_in_training"] = base.weight.to_local().numel()
            facts["activation_checkpointing"] = any("_checkpoint_wrapped_module" in n for n, _ in model.named_modules())
            facts["base_weight_type"] = type(base.weight).__name__
            facts["base_weight_dtype"] = str(base.weight.dtype)
        now = [time.perf_counter(), time.process_time()]
        step_times.append(now[0] - tick[0])
        cpu_times.append(now[1] - tick[1])
        tick[:] = now

    if args.crash_in_save:
        original = engine.save_state

        def save_then_die(accelerator, model, path, *rest):
            original(accelerator, model, path, *rest)
            if f"{args.crash_in_save:08d}" in str(path):
                accelerator.wait_for_everyone()
                os._exit(17)

        engine.save_state = save_then_die
    data = token_data(seq_len=args.seq_len, vocab=model.config.vocab_size)
    collate = stack_collate
    if args.variable_lengths:
        data, collate = variable_data(vocab=model.config.vocab_size), functools.partial(pad_collate, pad_id=0)
    gradients: dict[str, torch.Tensor] = {}
    if args.record_grads:
        record_first_gradients(model, {id(p): n for n, p in model.named_parameters() if p.requires_grad}, gradients)
    if args.lora:
        model, optimizer = lora_loop(model, data, config, accelerator, on_step, counter)
    else:
        counter.active = True
        lambdas = None
        if args.budget:
            from sora_dist.sparsity.budget import BudgetController

            lambdas = BudgetController(model, args.budget, args.steps, lambda_max=4.0)
        model, optimizer = train(model, data, config, accelerator, on_step=on_step, collate_fn=collate, lambdas=lambdas)
    counter.active = False
    facts["memory"] = model_state_bytes(accelerator.unwrap_model(model), optimizer)
    facts["step_times"] = step_times
    facts["cpu_times"] = cpu_times  # CPU seconds of this process per step: robust to other jobs on the machine
    facts["collectives"] = per_step
    client = engine.client_optimizer(optimizer)
    facts["gate_shard_numel"] = gate_shard_numel(optimizer, client)
    unwrapped = accelerator.unwrap_model(model)
    tensors = adapter_state(unwrapped)
    for name, gate in initial_gates.items():
        tensors[f"{name}.initial_gate"] = gate.float()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(facts, indent=1))
    if args.record_grads:
        save_file(gradients, str(out / f"rank{rank}_grads.safetensors"))
    engine.end_of_run()


def lora_loop(model, data, config, accelerator, on_step, counter):
    """The LoRA baseline: the same loop pieces as training.loop.train, without a gate group or λ."""
    from sora_dist.backends import accelerate as engine
    from sora_dist.training import batches, guard, loop, lr

    optimizer = loop.build_optimizer(model, config)
    if engine.uses_deepspeed(accelerator):
        engine.fill_deepspeed_config(accelerator, config.micro_batch_size, config.max_grad_norm)
    model, wrapped = accelerator.prepare(model, optimizer)
    micro_batches = batches.ShardedBatches(data, config.micro_batch_size, config.grad_accum, accelerator.process_index, accelerator.num_processes, config.seed)
    finite = guard.FiniteGuard(accelerator, config)
    counter.active = True
    for step in range(config.steps):
        lr.set_learning_rates(optimizer, step, config)
        loss = loop.optimizer_step(model, wrapped, micro_batches, step, accelerator, config)
        finite.observe(loss, step + 1)
        if guard.guard_due(step + 1, config, evaluating=False):
            finite.check(step + 1)
        on_step(step + 1, model, wrapped)
    return model, wrapped


if __name__ == "__main__":
    main()
