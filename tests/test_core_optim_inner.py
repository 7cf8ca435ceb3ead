"""SoRAOptimizer wraps the inner optimizer a user picks (sora_dist.backends.optimizers): N steps of
the wrapper equal N steps of the bare inner optimizer on A and B (bit-exact: it is the same code on
the same tensors), and the gates equal an independent computation: the inner's own step with no
weight decay, or plain SGD, or (inner SGD, prox_adam) an explicit Adam, followed by S_τ. The state
round-trips through state_dict, choices are named as users know them, and impossible ones are
refused at config time."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import batch, lm_loss, randomize_adapters, tiny_llama

from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_modules, sora_param_groups
from sora_dist.backends.optimizers import OPTIMIZERS, inner_optimizer
from sora_dist.config import ConfigError, load_config

STEPS, LR, GATE_LR, WD = 4, 2e-3, 5e-2, 0.1
LAMBDA = {"prox_adam": 1.5, "prox_sgd": 0.3}


def trained_pair(name: str, gate_update: str):
    """(model trained by the wrapper, model trained by the bare inner optimizer + a reference gate step)."""
    torch.manual_seed(0)
    model = inject_sora(tiny_llama(seed=0), SoRAConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]), verbose=False)
    randomize_adapters(model)
    reference = copy.deepcopy(model)
    inner, kwargs = inner_optimizer(name)
    groups = sora_param_groups(model, lr=LR, gate_lr=GATE_LR, weight_decay=WD, lambda_=LAMBDA[gate_update], gate_update=gate_update)
    wrapper = SoRAOptimizer(groups, lr=LR, inner=inner, **kwargs)

    ref_groups = sora_param_groups(reference, lr=LR, gate_lr=GATE_LR, weight_decay=WD)
    adapters = [{k: v for k, v in g.items() if k in ("params", "lr", "weight_decay")} for g in ref_groups if not g.get("sora_gate")]
    bare = inner(adapters, lr=LR, **kwargs)
    gates = [m.gate for _, m in sora_modules(reference)]
    adam_gates = "adam" in inner.__name__.lower()
    gate_opt = inner([{"params": gates, "lr": GATE_LR, "weight_decay": 0.0}], lr=GATE_LR, **kwargs) if adam_gates else None
    moments = {id(g): (torch.zeros_like(g), torch.zeros_like(g)) for g in gates}

    for step in range(1, STEPS + 1):
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
            lm_loss(m, batch(40 + step)).backward()
        wrapper.step()
        bare.step()
        with torch.no_grad():
            if gate_update == "prox_sgd":
                for g in gates:
                    g.add_(g.grad, alpha=-GATE_LR)
            elif gate_opt is not None:
                gate_opt.step()
            else:  # explicit bias-corrected Adam (betas 0.9, 0.999, eps 1e-8)
                for g in gates:
                    m1, v = moments[id(g)]
                    m1.mul_(0.9).add_(g.grad, alpha=0.1)
                    v.mul_(0.999).addcmul_(g.grad, g.grad, value=0.001)
                    g.sub_(GATE_LR * (m1 / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8))
            for g in gates:
                g.copy_(F.softshrink(g, GATE_LR * LAMBDA[gate_update]))
    return model, reference, wrapper


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("gate_update", ["prox_adam", "prox_sgd"])
def test_wrapper_steps_like_the_bare_inner_optimizer(name, gate_update):
    model, reference, _ = trained_pair(name, gate_update)
    got = dict(model.named_parameters())
    # With SGD as the inner optimizer a prox_adam gate takes our own Adam, which the reference writes
    # out element by element: the same math in other kernels, so equal to rounding; the rest is the
    # same code on the same tensors, so bit-exact.
    exact = not (name == "sgd" and gate_update == "prox_adam")
    zeros = 0
    for key, want in reference.named_parameters():
        if not want.requires_grad:
            continue
        if exact:
            assert torch.equal(got[key], want), f"{key} differs from the bare {name} step"
        else:
            torch.testing.assert_close(got[key], want, atol=1e-5, rtol=0, msg=key)
        zeros += int((want == 0).sum()) if key.endswith(".gate") else 0
    assert zeros > 0, "the test must exercise the soft-threshold"


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_8bit", "sgd"])
def test_state_dict_round_trip_continues_identically(name):
    """Save after 2 steps, load into a fresh wrapper, take 2 more: equal to 4 uninterrupted steps."""

    def run(split: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = inject_sora(tiny_llama(seed=0), SoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
        randomize_adapters(model)
        inner, kwargs = inner_optimizer(name)
        make = lambda: SoRAOptimizer(sora_param_groups(model, lr=LR, gate_lr=GATE_LR, lambda_=1.0), lr=LR, inner=inner, **kwargs)  # noqa: E731
        opt = make()
        for step in range(4):
            if split and step == 2:
                saved = copy.deepcopy(opt.state_dict())
                opt = make()
                opt.load_state_dict(saved)
            opt.zero_grad(set_to_none=True)
            lm_loss(model, batch(60 + step)).backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    straight, resumed = run(False), run(True)
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_optimizer_choices_are_checked_before_anything_loads():
    base = {"model": {"path": "m"}, "data": {"train_file": "t.jsonl"}}
    with pytest.raises(ConfigError, match=r"train\.optimizer: must be one of \['adamw_torch', 'adamw_torch_fused', 'adamw_8bit'"):
        load_config(raw={**base, "train": {"optimizer": "adam"}})
    with pytest.raises(ConfigError, match="paged_adamw_8bit cannot be combined with DeepSpeed's optimizer offload"):
        load_config(raw={**base, "train": {"optimizer": "paged_adamw_8bit"}, "distributed": {"deepspeed_config": "ds_configs/zero3_offload.json"}})
    assert load_config(raw={**base, "train": {"optimizer": "adamw_8bit"}}).train.optimizer == "adamw_8bit"


def test_optimizer_offload_takes_deepspeeds_cpu_adam():
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    assert inner_optimizer("adamw_torch", offload=True) == (DeepSpeedCPUAdam, {"adamw_mode": True})
    assert inner_optimizer("adamw_torch_fused") == (torch.optim.AdamW, {"fused": True})
    assert inner_optimizer("sgd", offload=True)[0] is torch.optim.SGD
