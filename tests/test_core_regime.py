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


# --- the scale-moving step (core/balance.py) -----------------------------------------------------


def adapted_model(seed: int = 0):
    from helpers import randomize_adapters, tiny_llama

    model = inject_sora(tiny_llama(seed=seed), SoRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]), verbose=False)
    randomize_adapters(model, seed=seed + 1, b_std=0.3)
    with torch.no_grad():  # a dead gate, an all-zero B column and an all-zero A row stay as they are
        layer = model.model.layers[0]
        layer.self_attn.q_proj.gate[0] = 0.0
        layer.self_attn.v_proj.lora_B[:, 1] = 0.0
        layer.mlp.up_proj.lora_A[2] = 0.0
    return model


def delta_w(model) -> dict[str, torch.Tensor]:
    from sora_dist import sora_modules

    return {name: (m.scale * (m.lora_B.double() * m.gate.double()) @ m.lora_A.double()) for name, m in sora_modules(model)}


def balanced_groups(model):
    return [g for g in sora_param_groups(model, lr=1e-3, normalize_factors=True) if g.get("normalize_factors")]


def test_moving_the_scale_into_the_gates_leaves_delta_w_unchanged():
    from sora_dist import sora_modules
    from sora_dist.core.balance import normalize_factors_

    model = adapted_model()
    before = delta_w(model)
    contribution = {n: m.gate.detach().double().abs() * m.lora_A.detach().double().norm(dim=1) * m.lora_B.detach().double().norm(dim=0)
                    for n, m in sora_modules(model)}  # fmt: skip
    gates = {n: m.gate.detach().double().abs().clone() for n, m in sora_modules(model)}
    normalize_factors_(balanced_groups(model))
    for name, m in sora_modules(model):
        torch.testing.assert_close(delta_w(model)[name], before[name], atol=1e-6, rtol=0)
        a, b = m.lora_A.detach().double().norm(dim=1), m.lora_B.detach().double().norm(dim=0)
        alive = (a > 0) & (b > 0)
        torch.testing.assert_close(a[alive], torch.ones_like(a[alive]), atol=1e-6, rtol=0)
        torch.testing.assert_close(b[alive], torch.ones_like(b[alive]), atol=1e-6, rtol=0)
        # |g| is now the rank's contribution / s; a rank without both factors keeps its gate
        torch.testing.assert_close(m.gate.detach().double().abs(), torch.where(alive, contribution[name], gates[name]), atol=1e-6, rtol=1e-6)
    q, v, up = (model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj, model.model.layers[0].mlp.up_proj)
    assert q.gate[0] == 0 and v.lora_B[:, 1].abs().sum() == 0 and up.lora_A[2].abs().sum() == 0


@pytest.mark.parametrize("processes", [2, 3])
def test_the_scale_moving_step_on_hand_made_zero_shards_equals_the_whole_tensor_step(processes):
    """Each param group flattened in order, padded and cut into equal pieces as ZeRO-1/2 do (rows of
    A and columns of B straddle pieces): per-piece partial squares, summed as the one all-reduce
    would, then per-piece rescaling, give exactly the whole-tensor result."""
    from sora_dist.core.balance import apply_factors_, factor_squares, normalize_factors_

    whole, sharded = adapted_model(), adapted_model()
    normalize_factors_(balanced_groups(whole))
    groups = balanced_groups(sharded)
    flats, shards = [], []
    for group in groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]])
        part = -(-flat.numel() // processes)
        flat = torch.cat([flat, torch.zeros(part * processes - flat.numel())])
        flats.append(flat)
        shards.append([{**group, "params": [flat[k * part : (k + 1) * part]]} for k in range(processes)])
    squares = sum(factor_squares([s[k] for s in shards], rank=k, sharded=True) for k in range(processes))
    for k in range(processes):
        apply_factors_([s[k] for s in shards], squares, rank=k, sharded=True)
    for group, flat in zip(balanced_groups(whole), flats):
        expected = torch.cat([p.detach().reshape(-1) for p in group["params"]])
        torch.testing.assert_close(flat[: expected.numel()], expected, atol=0, rtol=0)
