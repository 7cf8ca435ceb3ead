"""SoRAOptimizer and LambdaSchedule against closed forms and plain-PyTorch references.

Expected values are computed here, independently of sora_dist, in float64 from the same float32
inputs. Tolerances: a single float32 update of a value of magnitude <= ~3 rounds by <= ~3e-7, so
closed-form comparisons use atol 1e-6 (multi-step Adam: 2e-6; the soft-threshold is 1-Lipschitz
and Adam's moments do not depend on the parameter, so float32 rounding cannot grow across steps).
Cases near the threshold are built with a relative margin of 1e-3 * tau (>= 5e-5), far above
that rounding, so "exactly zero or not" is unambiguous and is checked with == 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import batch, lm_loss, tiny_bert_classifier, tiny_llama

from sora_dist import LambdaSchedule, SoRAConfig, SoRAOptimizer, inject_sora, sora_modules, sora_param_groups

ATOL = 1e-6


# ----------------------------------------------------------------------------- references


def soft64(z: torch.Tensor, tau: float) -> torch.Tensor:
    """S_tau(z) = sign(z) * max(|z| - tau, 0), written out in float64."""
    z = z.double()
    return torch.sign(z) * torch.clamp(z.abs() - tau, min=0.0)


def tau_of(lr: float, lam: float, threshold: str) -> float:
    return lr * lam if threshold == "lr_scaled" else lam


def gate_optimizer(gate, lr, lam, update, threshold, **kw):
    group = {"params": [gate], "sora_gate": True, "gate_update": update, "threshold": threshold, "prox_lambda": lam}
    return SoRAOptimizer([group], lr=lr, **kw)


def designed_targets(tau: float, n_random: int = 64, seed: int = 0) -> torch.Tensor:
    """Pre-threshold values z around the threshold: just above/below +-tau, at 0, far away, random."""
    m = 1e-3
    special = [
        tau * (1 + m), -tau * (1 + m),  # survive, barely
        tau * (1 - m), -tau * (1 - m),  # die, barely
        tau * (1 + 10 * m), -tau * (1 - 10 * m),
        0.0, 3 * tau, -3 * tau, 0.5 * tau, -0.5 * tau,
    ]
    g = torch.Generator().manual_seed(seed)
    rand = (torch.rand(n_random, generator=g, dtype=torch.float64) * 6 - 3) * tau
    z = torch.cat([torch.tensor(special, dtype=torch.float64), rand])
    # keep every random target out of the ambiguous band around +-tau
    band = (z.abs() - tau).abs() < m * tau * 0.5
    return torch.where(band, z * (1 + 4 * m), z)


# ----------------------------------------------------------------------------- prox_sgd


@pytest.mark.parametrize("threshold", ["lr_scaled", "fixed"])
def test_prox_sgd_matches_closed_form_with_zero_crossings_and_threshold_edges(threshold):
    """prox_sgd: g <- S_tau(g - lr*grad), tau = lr*lambda (lr_scaled) or lambda (fixed); zeros exact."""
    lr, lam = 0.1, 0.5
    tau = tau_of(lr, lam, threshold)
    z = designed_targets(tau)
    gen = torch.Generator().manual_seed(1)
    g0 = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    # indices 0-3 keep the designed threshold edges; 6-9 are gates that cross zero
    g0[6:10] = torch.tensor([0.7, -0.7, 0.3, -0.3], dtype=torch.float64)
    z[6:10] = torch.tensor([-3 * tau, 3 * tau, -1.5 * tau, 2 * tau], dtype=torch.float64)
    g0[-3:] = 0.0  # gates already dead: they revive only if the step exceeds tau
    z[-3:] = torch.tensor([0.5 * tau, -2 * tau, 0.0], dtype=torch.float64)
    grad = ((g0 - z) / lr).float()
    gate = torch.nn.Parameter(g0.float().clone())
    gate.grad = grad.clone()

    gate_optimizer(gate, lr, lam, "prox_sgd", threshold).step()

    pre = g0.float().double() - lr * grad.double()  # from the float32 inputs
    expected = soft64(pre, tau)
    torch.testing.assert_close(gate.detach().double(), expected, atol=ATOL, rtol=0)
    dead = pre.abs() <= tau
    assert dead.any() and (~dead).any()
    assert torch.equal(gate.detach() == 0, dead), "exact zeros must appear exactly where |z| <= tau"
    crossed = g0.float() * gate.detach() < 0
    assert crossed[6:10].all(), "the designed zero-crossings must flip sign"
    assert gate.detach()[-3] == 0 and gate.detach()[-2] < 0 and gate.detach()[-1] == 0, "a zero revives only past tau"


@pytest.mark.parametrize("update", ["prox_sgd", "prox_adam"])
@pytest.mark.parametrize("threshold", ["lr_scaled", "fixed"])
def test_lr_zero_leaves_gates_or_applies_only_the_fixed_threshold(update, threshold):
    """lr = 0: no gradient step; lr_scaled tau = 0 keeps gates bit-identical, fixed tau = lambda shrinks
    them (two steps: S_lambda(S_lambda(g)) = S_2lambda(g))."""
    lam = 0.4
    g0 = torch.randn(200)
    gate = torch.nn.Parameter(g0.clone())
    gate.grad = torch.randn(200)
    opt = gate_optimizer(gate, 0.0, lam, update, threshold)
    for _ in range(2):
        opt.step()
    if threshold == "lr_scaled":
        assert torch.equal(gate.detach(), g0)
    else:
        torch.testing.assert_close(gate.detach().double(), soft64(g0, 2 * lam), atol=ATOL, rtol=0)
        clear = (g0.abs() - 2 * lam).abs() > 1e-6
        assert torch.equal((gate.detach() == 0)[clear], (g0.abs() <= 2 * lam)[clear])


# ----------------------------------------------------------------------------- prox_adam


@pytest.mark.parametrize("threshold", ["lr_scaled", "fixed"])
def test_prox_adam_first_step_matches_closed_form_at_threshold_edges(threshold):
    """prox_adam step 1: m_hat = grad, v_hat = grad^2, g <- S_tau(g - lr*grad/(|grad|+eps)); zeros exact."""
    lr, lam, eps = 0.05, 0.8, 1e-8
    tau = tau_of(lr, lam, threshold)
    z = designed_targets(tau, seed=3)
    gen = torch.Generator().manual_seed(4)
    grad = ((torch.rand(z.shape, generator=gen) * 1.5 + 0.5) * torch.sign(torch.randn(z.shape, generator=gen))).float()
    u = grad.double() / (grad.double().abs() + eps)
    g0 = (z + lr * u).float()  # so that the pre-threshold value is (about) the designed z
    if threshold == "lr_scaled":  # a small positive gate pushed across zero by a full Adam step
        g0[0], grad[0] = lr - 1.1 * tau, 1.0
    gate = torch.nn.Parameter(g0.clone())
    gate.grad = grad.clone()

    gate_optimizer(gate, lr, lam, "prox_adam", threshold, betas=(0.9, 0.999), eps=eps).step()

    m_hat = (1 - 0.9) * grad.double() / (1 - 0.9)
    v_hat = (1 - 0.999) * grad.double() ** 2 / (1 - 0.999)
    pre = g0.double() - lr * m_hat / (v_hat.sqrt() + eps)
    expected = soft64(pre, tau)
    torch.testing.assert_close(gate.detach().double(), expected, atol=ATOL, rtol=0)
    dead = pre.abs() <= tau
    assert dead.any() and (~dead).any()
    assert torch.equal(gate.detach() == 0, dead)
    flipped = g0 * gate.detach() < 0
    if threshold == "lr_scaled":
        assert flipped[0], "the gate must cross zero"
    else:  # tau = lambda > lr bounds every Adam step: no gate can cross zero in one step
        assert tau > lr and not flipped.any()


@pytest.mark.parametrize("threshold", ["lr_scaled", "fixed"])
def test_prox_adam_several_steps_match_explicit_bias_corrected_moments(threshold):
    """prox_adam over 6 steps equals an explicit float64 Adam (bias-corrected m, v) followed by S_tau."""
    lr, lam, b1, b2, eps = 0.03, 0.5, 0.8, 0.99, 1e-8
    tau = tau_of(lr, lam, threshold)
    n = 500
    g0 = torch.randn(n) * (3 * tau if threshold == "fixed" else 0.2)
    gate = torch.nn.Parameter(g0.clone())
    opt = gate_optimizer(gate, lr, lam, "prox_adam", threshold, betas=(b1, b2), eps=eps)

    p = g0.double()
    m = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    zeros_seen = 0
    for t in range(1, 7):
        grad = torch.randn(n, generator=gen) * 0.1 + 0.05  # a consistent sign for many elements
        grad[:20] = 0.0  # zero gradients: only Adam's memory moves these
        gate.grad = grad.clone()
        opt.step()
        m = b1 * m + (1 - b1) * grad.double()
        v = b2 * v + (1 - b2) * grad.double() ** 2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        pre = p - lr * m_hat / (v_hat.sqrt() + eps)
        p = soft64(pre, tau)
        torch.testing.assert_close(gate.detach().double(), p, atol=2e-6, rtol=0)
        clear = ((pre.abs() - tau).abs() > 1e-5)
        assert torch.equal((gate.detach() == 0)[clear], (pre.abs() <= tau)[clear])
        zeros_seen += int((gate.detach() == 0).sum())
    assert zeros_seen > 0 and bool((gate.detach() != 0).any())
    assert opt.state[gate]["step"] == 6


def test_prox_adam_without_bias_correction_would_differ():
    """Sanity of the reference above: at step 1 with beta2=0.999 an uncorrected Adam moves ~3x farther."""
    lr = 0.01
    g0 = torch.full((8,), 5.0)
    gate = torch.nn.Parameter(g0.clone())
    gate.grad = torch.full((8,), 2.0)
    gate_optimizer(gate, lr, 0.0, "prox_adam", "lr_scaled").step()
    corrected = 5.0 - lr * 1.0  # m_hat/sqrt(v_hat) = 1
    uncorrected = 5.0 - lr * (0.1 * 2.0) / (math.sqrt(0.001 * 4.0) + 1e-8)
    torch.testing.assert_close(gate.detach(), torch.full((8,), corrected), atol=ATOL, rtol=0)
    assert abs(corrected - uncorrected) > 1e-3


# ----------------------------------------------------------------------------- AdamW groups


def test_non_gate_groups_equal_torch_adamw_with_weight_decay():
    """Non-gate groups take exactly torch.optim.AdamW's step (decay and no-decay groups, 7 steps)."""
    shapes = [(6, 5), (4, 6), (5,)]
    init = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    hp = dict(lr=2e-2, betas=(0.85, 0.99), eps=1e-7)
    opt = SoRAOptimizer([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}], **hp)
    ref_opt = torch.optim.AdamW([{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}], foreach=False, **hp)
    gen = torch.Generator().manual_seed(5)
    for step in range(7):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for i, (a, b) in enumerate(zip(ours, ref)):
            if step == 3 and i == 1:  # a parameter without a gradient is skipped (no decay either)
                a.grad = b.grad = None
            else:
                a.grad, b.grad = grads[i].clone(), grads[i].clone()
        opt.step()
        ref_opt.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a.detach(), b.detach()), "same single-tensor formula as torch AdamW: bit-exact"
    for a, b in zip(ours, ref):
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref_opt.state[b]["exp_avg_sq"], atol=1e-9, rtol=1e-7)
    assert not torch.equal(ours[0].detach(), init[0])


def test_weight_decay_never_touches_gates():
    """With weight_decay > 0 and zero gradients, adapters shrink by (1 - lr*wd) and gates stay bit-identical."""
    model = inject_sora(tiny_llama(), SoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
    lr, wd = 0.1, 0.5
    groups = sora_param_groups(model, lr=lr, weight_decay=wd, lambda_=0.0)
    gate_group = [g for g in groups if g.get("sora_gate")]
    assert len(gate_group) == 1 and gate_group[0]["weight_decay"] == 0.0
    opt = SoRAOptimizer(groups, lr=lr)
    mods = dict(sora_modules(model))
    before = {n: (m.lora_A.detach().clone(), m.gate.detach().clone()) for n, m in mods.items()}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    for _ in range(3):
        opt.step()
    for name, m in mods.items():
        a0, g0 = before[name]
        assert torch.equal(m.gate.detach(), g0), f"{name}: weight decay touched the gate"
        torch.testing.assert_close(m.lora_A.detach().double(), a0.double() * (1 - lr * wd) ** 3, atol=1e-7, rtol=1e-6)


def test_sora_param_groups_split_gates_adapters_and_extras():
    """Gates go to one sora_gate group (with lambda/update/threshold), lora_A/B decay, 1-d extras do not."""
    model = inject_sora(tiny_bert_classifier(), SoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"]), verbose=False)
    groups = sora_param_groups(model, lr=1e-3, gate_lr=5e-2, weight_decay=0.01, lambda_=0.3, gate_update="prox_sgd", threshold="fixed")
    by_name = {g["group_name"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    gate_names = {names[id(p)] for p in by_name["gate"]["params"]}
    assert gate_names == {f"{n}.gate" for n, _ in sora_modules(model)}
    assert by_name["gate"]["lr"] == 5e-2 and by_name["gate"]["prox_lambda"] == 0.3
    assert by_name["gate"]["gate_update"] == "prox_sgd" and by_name["gate"]["threshold"] == "fixed"
    decay = {names[id(p)] for p in by_name["adapter"]["params"]}
    no_decay = {names[id(p)] for p in by_name["adapter_no_decay"]["params"]}
    assert "classifier.weight" in decay and "classifier.bias" in no_decay
    assert all(n.endswith(("lora_A", "lora_B", "classifier.weight")) for n in decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert gate_names | decay | no_decay == trainable
    with pytest.raises(ValueError, match="no SoRA modules"):
        sora_param_groups(tiny_llama(), lr=1e-3)


# ----------------------------------------------------------------------------- invalid settings


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"gate_update": "adam"}, "gate_update"),
        ({"threshold": "soft"}, "threshold"),
        ({"prox_lambda": -0.1}, "prox_lambda"),
        ({"weight_decay": 0.01}, "weight decay"),
        ({"lr": -1.0}, "lr|learning rate"),
    ],
)
def test_invalid_gate_group_settings_raise_clear_errors(bad, match):
    """Invalid gate-group keys fail at construction and in add_param_group, naming the key."""
    group = {"params": [torch.nn.Parameter(torch.ones(3))], "sora_gate": True, **bad}
    with pytest.raises(ValueError, match=match):
        SoRAOptimizer([group], lr=1e-3)
    opt = SoRAOptimizer([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], "sora_gate": True, **bad})


def test_invalid_optimizer_defaults_raise():
    """A negative default lr fails; a default weight decay inherited by a gate group fails too."""
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="learning rate"):
        SoRAOptimizer([p], lr=-1e-3)
    with pytest.raises(ValueError, match="weight decay"):
        SoRAOptimizer([{"params": [p], "sora_gate": True}], lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="lr|learning rate"):
        SoRAOptimizer([{"params": [p], "lr": -0.5}], lr=1e-3)


# ----------------------------------------------------------------------------- ZeRO-style shards


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


@pytest.mark.parametrize("update,threshold", [("prox_adam", "lr_scaled"), ("prox_sgd", "fixed"), ("prox_adam", "fixed"), ("prox_sgd", "lr_scaled")])
def test_sharded_step_equals_unsharded_step(update, threshold):
    """ZeRO emulation: each group flattened to one fp32 tensor, cut in 2 uneven shards, one optimizer per
    shard (other group keys kept); after 5 steps the concatenated shards equal the unsharded step."""
    model = inject_sora(tiny_llama(), SoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), verbose=False)
    lam = 0.5 if threshold == "fixed" else {"prox_adam": 1.5, "prox_sgd": 0.4}[update]
    lr = {"prox_adam": 0.05, "prox_sgd": 0.5}[update]
    groups = sora_param_groups(model, lr=1e-2, gate_lr=lr, weight_decay=0.1, lambda_=lam, gate_update=update, threshold=threshold)
    opt = SoRAOptimizer(groups, lr=1e-2, betas=(0.9, 0.98))

    # shards: group i, rank k -> one flat fp32 leaf tensor; the cut falls inside a tensor
    shard_opts, shards = [], []
    for rank in range(2):
        rank_groups, rank_shards = [], []
        for group in opt.param_groups:
            flat = _flat(group["params"])
            cut = flat.numel() // 2 + 3
            piece = (flat[:cut] if rank == 0 else flat[cut:]).clone()
            rank_shards.append((piece, cut))
            rank_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [piece]})
        shard_opts.append(SoRAOptimizer(rank_groups, lr=1e-2, betas=(0.9, 0.98)))
        shards.append(rank_shards)

    zeros = 0
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        lm_loss(model, batch(50 + step)).backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        for gi, group in enumerate(opt.param_groups):
            flat_grad = _flat([p.grad for p in group["params"]])
            for rank in range(2):
                piece, cut = shards[rank][gi]
                piece.grad = (flat_grad[:cut] if rank == 0 else flat_grad[cut:]).clone()
        opt.step()
        for so in shard_opts:
            so.step()
        for gi, group in enumerate(opt.param_groups):
            whole = _flat(group["params"])
            joined = torch.cat([shards[0][gi][0], shards[1][gi][0]])
            torch.testing.assert_close(joined, whole, atol=1e-7, rtol=0)  # bit-exact here
            if group.get("sora_gate"):
                zeros = int((whole == 0).sum())
                assert torch.equal(joined == 0, whole == 0)
    assert zeros > 0, "the test must exercise the soft-threshold (some gates at exact zero)"


# ----------------------------------------------------------------------------- lambda schedule


def _gate_opt():
    p, g = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    return SoRAOptimizer([{"params": [p]}, {"params": [g], "sora_gate": True, "prox_lambda": 0.0}], lr=1e-3)


@pytest.mark.parametrize(
    "kind,start,end,steps",
    [("constant", 0.3, None, 0), ("linear", 0.1, 0.9, 8), ("linear", 1.0, 0.2, 5), ("geometric", 1e-3, 1.0, 6)],
)
def test_lambda_schedule_values_match_closed_form_and_are_written_to_gate_group(kind, start, end, steps):
    """constant: start; linear: start + min(t,T)/T (end-start); geometric: start (end/start)^(min(t,T)/T)."""
    sched = LambdaSchedule(kind, start, end, steps)
    opt = _gate_opt()

    def closed(t):
        if kind == "constant":
            return start
        f = min(t, steps) / steps
        return start + f * (end - start) if kind == "linear" else start * (end / start) ** f

    assert sched.value(0) == pytest.approx(closed(0), rel=1e-12, abs=0)
    for t in range(1, (steps or 3) + 4):
        lam = sched.step(opt)
        assert lam == pytest.approx(closed(t), rel=1e-12, abs=1e-15)
        assert opt.param_groups[1]["prox_lambda"] == lam
        assert opt.param_groups[0]["prox_lambda"] == 0.0, "only gate groups get lambda"
    if kind != "constant":
        assert sched.value() == pytest.approx(end, rel=1e-12)


def test_lambda_schedule_state_dict_round_trip_continues_identically():
    """A schedule restored from state_dict continues with exactly the values of the original."""
    a = LambdaSchedule("geometric", 0.01, 2.0, 10)
    opt_a, opt_b = _gate_opt(), _gate_opt()
    for _ in range(4):
        a.step(opt_a)
    b = LambdaSchedule("linear", 5.0, 6.0, 3)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for _ in range(9):
        assert a.step(opt_a) == b.step(opt_b)
        assert opt_a.param_groups[1]["prox_lambda"] == opt_b.param_groups[1]["prox_lambda"]


def test_lambda_schedule_drives_the_threshold_of_the_next_step():
    """After schedule.step, the optimizer's next prox_sgd step thresholds with lr * new lambda."""
    gate = torch.nn.Parameter(torch.full((4,), 1.0))
    opt = gate_optimizer(gate, 0.1, 0.0, "prox_sgd", "lr_scaled")
    sched = LambdaSchedule("linear", 0.0, 4.0, 2)
    sched.step(opt)  # lambda = 2 -> tau = 0.2
    gate.grad = torch.zeros(4)
    opt.step()
    torch.testing.assert_close(gate.detach(), torch.full((4,), 0.8), atol=ATOL, rtol=0)


def test_lambda_schedule_invalid_arguments_raise():
    with pytest.raises(ValueError, match="kind"):
        LambdaSchedule("cosine", 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        LambdaSchedule("constant", -0.1)
    with pytest.raises(ValueError, match="geometric"):
        LambdaSchedule("geometric", 0.0, 1.0, 5)
    with pytest.raises(ValueError, match="steps"):
        LambdaSchedule("linear", 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="no SoRA gate group"):
        LambdaSchedule("constant", 0.1).step(SoRAOptimizer([torch.nn.Parameter(torch.ones(2))]))
