"""The released code's regime (fixed ξ, the L1 term in the loss, decay on A and B, gate lr = adapter
lr) against closed forms and a plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from test_core_optim import soft64

from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_param_groups
from sora_dist.core.optim import GATE_COUNT, GATE_L1


def gate_group(gate, xi, l1, count):
    return {"params": [gate], "sora_gate": True, "gate_update": "prox_adam", "threshold": "fixed", "prox_lambda": xi,
            GATE_L1: l1, GATE_COUNT: count}  # fmt: skip


def test_l1_term_equals_adam_on_the_loss_plus_l1_then_the_fixed_threshold():
    """3 steps: ours (gradient of the loss alone, gate_l1 in the group) equals torch.optim.Adam on
    loss + l1 · Σ|g| / n (autograd), followed by S_ξ, written out here."""
    torch.manual_seed(0)
    n, lr, xi, l1 = 64, 1e-2, 2e-2, 10.0
    g0 = torch.randn(n)
    g0[:8] *= 0.01  # within ξ of zero: S_ξ ends them
    ours = torch.nn.Parameter(g0.clone())
    opt = SoRAOptimizer([gate_group(ours, xi, l1, count=4 * n)], lr=lr, betas=(0.9, 0.999), eps=1e-6)
    ref = torch.nn.Parameter(g0.clone())
    ref_opt = torch.optim.Adam([ref], lr=lr, betas=(0.9, 0.999), eps=1e-6)
    target = torch.randn(n)
    for _ in range(3):
        loss = ((ours - target) ** 2).sum()
        ours.grad = torch.autograd.grad(loss, ours)[0]
        opt.step()
        ref_loss = ((ref - target) ** 2).sum() + l1 * ref.abs().sum() / (4 * n)
        ref.grad = torch.autograd.grad(ref_loss, ref)[0]
        ref_opt.step()
        with torch.no_grad():
            ref.copy_(soft64(ref, xi).float())
        torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-6, rtol=0)
    assert bool((ours == 0).any()) and bool((ours != 0).any())


def test_the_l1_gradient_is_l1_over_the_models_gate_count_times_sign():
    """Closed form of the added gradient on a flat shard of the gates: l1 / n_gates · sign(g), where
    n_gates counts the whole model's gates, not the shard's; a zero gate gets none."""
    shard = torch.nn.Parameter(torch.tensor([0.5, -2.0, 0.0, 3.0]))
    shard.grad = torch.tensor([0.1, 0.1, 0.1, 0.1])
    group = {**gate_group(shard, 0.0, 6.0, count=48), "gate_update": "prox_sgd", "lr": 1.0}
    opt = SoRAOptimizer([group], lr=1.0)
    opt.step()
    expected = torch.tensor([0.5, -2.0, 0.0, 3.0]) - (0.1 + 6.0 / 48 * torch.tensor([1.0, -1.0, 0.0, 1.0]))
    torch.testing.assert_close(shard.detach(), expected, atol=1e-7, rtol=0)


def test_groups_carry_the_l1_term_and_the_models_gate_count():
    from helpers import tiny_llama

    model = inject_sora(tiny_llama(seed=0), SoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
    groups = {g["group_name"]: g for g in sora_param_groups(model, lr=8e-4, weight_decay=0.1, lambda_=3e-4, threshold="fixed", gate_l1=10)}
    assert groups["gate"][GATE_L1] == 10 and groups["gate"][GATE_COUNT] == 4 * 4  # 2 layers x (q, v) x r=4
    assert groups["gate"]["lr"] == groups["adapter"]["lr"] == 8e-4 and groups["adapter"]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="gate_l1 must be a finite number >= 0"):
        SoRAOptimizer([{**groups["gate"], GATE_L1: -1.0}], lr=1e-3)
