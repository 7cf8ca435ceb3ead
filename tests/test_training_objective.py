"""The objective of a causal LM step is the mean over the target tokens of the whole step: the
gradient that reaches the optimizer is the same for one process with the global batch, one process
with gradient accumulation, and 2 processes (DDP, ZeRO-2, ZeRO-3), on rows whose lengths differ 8x,
and it equals a plain-PyTorch token-mean computed without sora_dist's loop."""

from __future__ import annotations

import pytest
import torch
from dist_worker import SEED, randomize_b, variable_data
from helpers import launch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

GLOBAL_BATCH = 8
COMMON = ("--variable-lengths", "--record-grads", "--steps", "1", "--max-grad-norm", "0", "--lr", "0", "--gate-lr", "0")
RUNS = {
    "1 process x 8": ("single", 1, 8, 1),
    "1 process x 4 x accumulation 2": ("single", 1, 4, 2),
    "2 processes x 4, DDP": ("ddp", 2, 4, 1),
    "2 processes x 4, ZeRO-2": ("zero2", 2, 4, 1),
    "2 processes x 4, ZeRO-3": ("zero3", 2, 4, 1),
}


def reference_gradients(model_dir) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain PyTorch: the first step's 8 examples (position 0..7 of the seed's permutation), each
    row run on its own (no padding); (Σ token losses / Σ target tokens) and, for contrast, the mean
    of two 4-example micro-batch means (what averaging per-micro-batch losses gives)."""
    from sora_dist import SoRAConfig, inject_sora
    from sora_dist.models import load_model

    rows = variable_data()
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SEED))[:GLOBAL_BATCH].tolist()
    grads = []
    for per_micro_batch in (False, True):
        model = load_model(str(model_dir), "causal_lm", torch.float32)
        torch.manual_seed(SEED)
        inject_sora(model, SoRAConfig(r=4, alpha=8.0), verbose=False)
        randomize_b(model)
        losses, counts = [], []
        for i in order:
            ids = torch.tensor([rows[i]["input_ids"]])
            logits = model(input_ids=ids).logits
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            counts.append(ids.shape[1] - 1)
        if per_micro_batch:
            halves = [sum(losses[k : k + 4]) / sum(counts[k : k + 4]) for k in (0, 4)]
            loss = (halves[0] + halves[1]) / 2
        else:
            loss = sum(losses) / sum(counts)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    return grads[0], grads[1]


def relative(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert sorted(got) == sorted(want)
    diff = torch.cat([(got[k] - want[k]).flatten() for k in want])
    return float(diff.norm() / torch.cat([w.flatten() for w in want.values()]).norm())


def test_step_gradient_is_the_token_mean_whatever_the_split(dist_model_dir, tmp_path):
    want, per_micro_batch = reference_gradients(dist_model_dir)
    assert relative(per_micro_batch, want) > 1e-2, "the rows must be uneven enough for the normalization to matter"
    for name, (backend, processes, micro, accumulation) in RUNS.items():
        out = tmp_path / backend / f"{micro}x{accumulation}"
        launch(out, dist_model_dir, "--backend", backend, "--micro-batch-size", str(micro), "--grad-accum", str(accumulation),
               *COMMON, nproc=processes)  # fmt: skip
        for rank in range(processes):
            got = load_file(str(out / f"rank{rank}_grads.safetensors"))
            assert relative(got, want) <= 1e-5, f"{name}, rank {rank}: relative difference {relative(got, want):.2e}"
