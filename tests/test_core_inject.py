"""SoRALinear and inject_sora: the forward formula, targeting, freezing, dtypes, and LoRA equivalence.

References are written here in plain PyTorch: h = W0 x + b + s * B diag(g) A x in float64 for the
layer, and a hand-written LoRA (h = W0 x + (alpha/r) B A x) trained with torch.optim.AdamW for the
lambda = 0 equivalence.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from helpers import LLAMA_PROJ, batch, linear_names, lm_loss, tiny_llama, train_steps
from torch import nn

from sora_dist import (
    SoRAConfig,
    SoRALinear,
    SoRAOptimizer,
    inject_sora,
    prune_sora,
    sora_modules,
    sora_param_groups,
    sparsity_report,
    trainable_summary,
)

# ----------------------------------------------------------------------------- SoRALinear


def test_forward_equals_closed_form_in_float64():
    """SoRALinear(x) = W0 x + b + (alpha/r) * B diag(g) A x (fp32 vs float64 reference, atol 1e-5)."""
    base = nn.Linear(24, 10)
    layer = SoRALinear(base, r=6, alpha=12.0)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate[2] = 0.0
    x = torch.randn(3, 5, 24)
    W, b = base.weight.double(), base.bias.double()
    A, B, g = layer.lora_A.double(), layer.lora_B.double(), layer.gate.double()
    expected = x.double() @ W.T + b + (12.0 / 6) * ((x.double() @ A.T) * g) @ B.T
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
    delta = (12.0 / 6) * B @ torch.diag(g) @ A
    torch.testing.assert_close(layer.delta_weight().double(), delta, atol=1e-6, rtol=1e-6)
    assert layer.delta_weight().dtype == torch.float32


def test_init_B_zero_A_kaiming_bound_and_scale_fixed():
    """B = 0 (output equals the base at init), |A| <= 1/sqrt(d_in) (kaiming-uniform a=sqrt(5)), s = alpha/r."""
    base = nn.Linear(400, 30)
    layer = SoRALinear(base, r=64, alpha=16.0)
    x = torch.randn(4, 400)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.95 * bound  # uniform over [-bound, bound], 25600 draws
    assert layer.scale == 16.0 / 64
    assert layer.rank == 64


@pytest.mark.parametrize("gate_init", ["ones", "normal"])
def test_gate_init(gate_init):
    """gate_init='ones' gives exactly ones; 'normal' gives N(0,1) (4096 draws: |mean|<0.1, |std-1|<0.1)."""
    layer = SoRALinear(nn.Linear(8, 8), r=4096, alpha=1.0, gate_init=gate_init)
    g = layer.gate.detach()
    if gate_init == "ones":
        assert torch.equal(g, torch.ones(4096))
    else:
        assert abs(g.mean().item()) < 0.1 and abs(g.std().item() - 1) < 0.1
        assert (g < 0).any() and (g > 0).any()


def test_shapes_come_from_declared_features_and_base_is_not_copied():
    """A/B shapes follow in_features/out_features even if weight is an empty (ZeRO-3-like) tensor."""
    base = nn.Linear(12, 7, bias=False)
    storage = base.weight.data_ptr()
    layer = SoRALinear(base, r=3, alpha=3.0)
    assert layer.base is base and layer.base.weight.data_ptr() == storage
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3) and layer.gate.shape == (3,)

    partitioned = nn.Linear(12, 7, bias=False)
    partitioned.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    layer = SoRALinear(partitioned, r=3, alpha=3.0)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3)


def test_invalid_layer_arguments_raise():
    with pytest.raises(ValueError, match="rank"):
        SoRALinear(nn.Linear(4, 4), r=0, alpha=1.0)
    with pytest.raises(ValueError, match="gate_init"):
        SoRALinear(nn.Linear(4, 4), r=2, alpha=1.0, gate_init="zeros")
    with pytest.raises(TypeError, match="in_features"):
        SoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=1.0)


def test_fp32_adapter_on_bf16_base_gives_bf16_output_and_fp32_grads():
    """Adapters stay fp32 on a bf16 base; a bf16 input gives a bf16 output close to the fp64 formula."""
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = SoRALinear(base, r=4, alpha=8.0, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert {p.dtype for p in (layer.lora_A, layer.lora_B, layer.gate)} == {torch.float32}
    x = torch.randn(2, 32).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    xd = x.double()
    ref = xd @ base.weight.double().T + base.bias.double()
    ref = ref + 2.0 * ((xd @ layer.lora_A.double().T) * layer.gate.double()) @ layer.lora_B.double().T
    # bf16 has 8 mantissa bits: relative rounding ~4e-3 per op on values of size ~|ref|
    torch.testing.assert_close(out.double(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.gate.grad.dtype == torch.float32


def test_bf16_model_with_fp32_adapters_end_to_end():
    """inject_sora on a bf16 tiny Llama: adapter params fp32, logits bf16, loss backward reaches adapters."""
    model = tiny_llama().to(torch.bfloat16)
    inject_sora(model, SoRAConfig(r=2, target_modules=["q_proj", "down_proj"]), verbose=False)
    for _, m in sora_modules(model):
        assert m.lora_A.dtype == m.lora_B.dtype == m.gate.dtype == torch.float32
        assert m.base.weight.dtype == torch.bfloat16
    out = model(input_ids=batch(0), labels=batch(0))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for _, m in sora_modules(model))


# ----------------------------------------------------------------------------- inject_sora targeting


def _wrapped(model):
    return {name for name, _ in sora_modules(model)}


def test_target_list_of_names_matches_name_suffixes():
    """A list of names wraps exactly the Linear modules whose name ends with one of them."""
    model = tiny_llama()
    expected = {n for n in linear_names(model) if n.rsplit(".", 1)[-1] in ("q_proj", "v_proj")}
    inject_sora(model, SoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), verbose=False)
    assert _wrapped(model) == expected and len(expected) == 4


def test_target_regex_fullmatches_full_names():
    """A string is a regex full-matched against the full module name."""
    pattern = r"model\.layers\.0\.(self_attn\.[qk]_proj|mlp\.up_proj)"
    model = tiny_llama()
    expected = {n for n in linear_names(model) if re.fullmatch(pattern, n)}
    inject_sora(model, SoRAConfig(r=2, target_modules=pattern), verbose=False)
    assert _wrapped(model) == expected and len(expected) == 3


def test_all_linear_wraps_every_linear_except_the_output_head():
    """'all-linear' wraps every nn.Linear but lm_head, which stays a plain frozen Linear."""
    model = tiny_llama()
    expected = set(linear_names(model)) - {"lm_head"}
    inject_sora(model, SoRAConfig(r=2), verbose=False)
    assert _wrapped(model) == expected and len(expected) == 2 * len(LLAMA_PROJ)
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad


def test_only_adapters_and_modules_to_save_are_trainable():
    """After inject: trainable = {lora_A, lora_B, gate of every branch} + all params of modules_to_save."""
    model = tiny_llama(cls_name="LlamaForSequenceClassification", num_labels=3)
    inject_sora(model, SoRAConfig(r=2, modules_to_save=["score"]), verbose=False)
    wrapped = _wrapped(model)
    assert "score" not in wrapped and len(wrapped) == 2 * len(LLAMA_PROJ)
    expected = {f"{m}.{k}" for m in wrapped for k in ("lora_A", "lora_B", "gate")} | {"score.weight"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    # parameter count: sum r(d_in + d_out) + r per branch, plus the head
    adapters = sum(2 * (m.in_features + m.out_features) + 2 for _, m in sora_modules(model))
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable params: {adapters + model.score.weight.numel():,} " in trainable_summary(model)
    assert f"all params: {total:,} " in trainable_summary(model)


def test_base_weights_are_shared_not_copied():
    """Each SoRALinear holds the original Linear object: same parameter, same storage."""
    model = tiny_llama()
    before = {n: (model.get_submodule(n), model.get_submodule(n).weight.data_ptr()) for n in linear_names(model)}
    inject_sora(model, SoRAConfig(r=2), verbose=False)
    for name, layer in sora_modules(model):
        original, ptr = before[name]
        assert layer.base is original and layer.base.weight.data_ptr() == ptr
        assert not layer.base.weight.requires_grad


def test_matching_nothing_raises_with_candidate_names():
    """A target list that matches nothing fails with a ValueError listing the Linear candidates."""
    with pytest.raises(ValueError) as info:
        inject_sora(tiny_llama(), SoRAConfig(target_modules=["query", "value"]), verbose=False)
    message = str(info.value)
    for name in LLAMA_PROJ + ("lm_head", "all-linear"):
        assert name in message


def test_inject_twice_and_unknown_modules_to_save_raise():
    model = inject_sora(tiny_llama(), SoRAConfig(r=2, target_modules=["q_proj"]), verbose=False)
    with pytest.raises(ValueError, match="already"):
        inject_sora(model, SoRAConfig(r=2, target_modules=["v_proj"]), verbose=False)
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_sora(tiny_llama(), SoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["classifier"]), verbose=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"r": 0}, "r: must"), ({"dropout": 1.0}, "dropout"), ({"gate_init": "zero"}, "gate_init"), ({"adapter_dtype": "float33"}, "adapter_dtype")],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SoRAConfig(**kwargs)


# ----------------------------------------------------------------------------- LoRA equivalence


class RefLoRA(nn.Module):
    """Plain LoRA written from the formula: h = W0 x + (alpha / r) * B A x."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.T @ self.B.T)


@pytest.mark.parametrize("freeze", ["requires_grad_false", "gate_lr_zero"])
def test_lambda_zero_with_ones_gate_trains_like_plain_lora(freeze):
    """lambda = 0, gates fixed at ones: 6 AdamW steps of SoRA equal a hand-written LoRA + torch AdamW
    (losses rtol 1e-5, A/B atol 1e-6 after training; observed bit-exact here, since g*s = s exactly)."""
    lr, wd, alpha, r = 1e-2, 0.05, 16.0, 4
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    base = tiny_llama(seed=3)
    ref_model = copy.deepcopy(base)
    model = inject_sora(base, SoRAConfig(r=r, alpha=alpha, target_modules=targets, gate_init="ones"), verbose=False)

    ref_model.requires_grad_(False)
    ref_params = []
    for name, m in sora_modules(model):
        parent, _, child = name.rpartition(".")
        ref = RefLoRA(ref_model.get_submodule(name), m.lora_A, m.lora_B, alpha / r)
        setattr(ref_model.get_submodule(parent), child, ref)
        ref_params += [ref.A, ref.B]
    ref_opt = torch.optim.AdamW(ref_params, lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)

    if freeze == "requires_grad_false":
        for _, m in sora_modules(model):
            m.gate.requires_grad_(False)
        groups = sora_param_groups(model, lr=lr, weight_decay=wd)
        assert not any(g.get("sora_gate") for g in groups)
    else:
        groups = sora_param_groups(model, lr=lr, gate_lr=0.0, weight_decay=wd, lambda_=0.0)
    opt = SoRAOptimizer(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)

    for step in range(6):
        ids = batch(200 + step)
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        loss, ref_loss = lm_loss(model, ids), lm_loss(ref_model, ids)
        loss.backward()
        ref_loss.backward()
        opt.step()
        ref_opt.step()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, m in sora_modules(model):
        ref = ref_model.get_submodule(name)
        assert torch.equal(m.gate.detach(), torch.ones(r)), "gates must stay exactly 1"
        torch.testing.assert_close(m.lora_A.detach(), ref.A.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(m.lora_B.detach(), ref.B.detach(), atol=1e-6, rtol=0)
        assert m.lora_B.detach().abs().max() > 1e-3, "B must have moved away from zero"


# ----------------------------------------------------------------------------- sparsity report


def test_enough_lambda_gives_exact_zeros_and_consistent_sparsity_report():
    """prox_adam with lambda*sum(lr) ~ 1: exact zero gates appear; the report's live ranks equal the
    (gate != 0) counts and its parameter count equals sum |K| (d_in + d_out) (SORA.md)."""
    model = inject_sora(tiny_llama(seed=5), SoRAConfig(r=6, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]), verbose=False)
    opt = SoRAOptimizer(sora_param_groups(model, lr=5e-3, gate_lr=0.05, lambda_=0.9), lr=5e-3)
    train_steps(model, opt, steps=12)
    gates = {n: m.gate.detach() for n, m in sora_modules(model)}
    zeros = sum(int((g == 0).sum()) for g in gates.values())
    total = sum(g.numel() for g in gates.values())
    assert 0 < zeros < total, f"expected a mix of dead and live gates, got {zeros}/{total} zeros"

    report = sparsity_report(model)
    by_name = {m.name: m for m in report.modules}
    assert set(by_name) == set(gates)
    expected_params = 0
    for name, m in sora_modules(model):
        live = int((m.gate != 0).sum())
        d_in, d_out = m.lora_A.shape[1], m.lora_B.shape[0]
        assert by_name[name].live_rank == live and by_name[name].zero_gates == 6 - live
        assert by_name[name].params == live * (d_in + d_out)
        expected_params += live * (d_in + d_out)
    assert report.params == expected_params
    assert report.live_rank == total - zeros and report.r_max_total == total
    assert report.dense_params == sum(6 * (m.in_features + m.out_features) for _, m in sora_modules(model))
    d = report.to_dict()
    assert d["total_params"] == expected_params and d["kept_fraction"] == pytest.approx(expected_params / report.dense_params)
    assert f"{report.live_rank}/{report.r_max_total} live ranks" in report.table()

    # after pruning, the adapter really has that many parameters, and the report is unchanged
    prune_sora(model)
    kept = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in sora_modules(model))
    assert kept == expected_params
    after = sparsity_report(model)
    assert after.params == report.params and after.dense_params == report.dense_params
