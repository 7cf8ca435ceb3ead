"""Rank compaction (sora_dist.core.prune.compact_model_and_optimizer, and sparsity_schedule.compact
in sora-train): dead ranks removed physically, optimizer state carried over.

Reference for "training continues exactly": the uncompacted model with the same optimizer state,
stepped on the same batches. Its dead ranks have exactly zero effect as long as their gates stay
zero, which the proximal step guarantees only while |Adam step| <= tau; the continuation therefore
runs with a large lambda (tau = 0.05 x 4 = 0.2 > the largest bias-corrected Adam step here) and the
test verifies that every dead gate of the reference is still exactly zero. Then the compacted
model must equal the reference's live slices (A rows, B columns, gate entries, Adam moments).
"""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from helpers import batch, logits, staged_config, tiny_llama, train_steps
from safetensors.torch import load_file
from torch import nn

from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, sora_modules, sora_param_groups
from sora_dist.cli import run, train_main
from sora_dist.core.prune import compact_model_and_optimizer, physical_adapter_params
from sora_dist.training.stages import COLUMNS

R = 6
DEAD = "model.layers.0.self_attn.v_proj"  # every gate zeroed by hand: becomes its bare base Linear
GATE_LR = 0.05
CONTINUE_LAMBDA = 4.0


def state_numel(optimizer) -> int:
    return sum(v.numel() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama with SoRA, 10 steps with lambda (some gates exactly zero), DEAD zeroed by hand."""
    torch.manual_seed(0)
    model = inject_sora(tiny_llama(seed=7), SoRAConfig(r=R, alpha=12.0), verbose=False)
    opt = SoRAOptimizer(sora_param_groups(model, lr=1e-2, gate_lr=GATE_LR, lambda_=0.9, weight_decay=0.01), lr=1e-2)
    train_steps(model, opt, steps=10)
    with torch.no_grad():
        model.get_submodule(DEAD).gate.zero_()
    live = {n: int((m.gate != 0).sum()) for n, m in sora_modules(model)}
    assert any(0 < k < R for k in live.values()), f"need partially pruned modules, got {live}"
    return model, opt


def test_compaction_keeps_outputs_shrinks_state_and_continues_like_the_masked_model(trained):
    reference, ref_opt = copy.deepcopy(trained)
    model, opt = copy.deepcopy(trained)
    keep = {n: torch.nonzero(m.gate.detach() != 0).flatten() for n, m in sora_modules(model)}
    ids = batch(3, n=2, seq=12)
    before = logits(model, ids)
    params_before, state_before = physical_adapter_params(model), state_numel(opt)

    new_opt, removed = compact_model_and_optimizer(model, opt)

    # Outputs unchanged, DEAD is its bare base, every other module has exactly its live ranks.
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    assert type(model.get_submodule(DEAD)) is nn.Linear
    assert removed == {n: R - k.numel() for n, k in keep.items() if k.numel() < R}
    for name, module in sora_modules(model):
        assert module.rank == keep[name].numel() > 0
    assert physical_adapter_params(model) == sum(k.numel() * (m.in_features + m.out_features + 1)
                                                 for (n, m), k in zip(sora_modules(reference), keep.values()) if k.numel())  # fmt: skip
    assert physical_adapter_params(model) < params_before

    # The carried optimizer: same groups and hyperparameters, state on the new tensors, sliced.
    assert isinstance(new_opt, SoRAOptimizer) and len(new_opt.param_groups) == len(opt.param_groups)
    for old, new in zip(opt.param_groups, new_opt.param_groups):
        assert {k: v for k, v in old.items() if k != "params"} == {k: v for k, v in new.items() if k != "params"}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    carried = [p for g in new_opt.param_groups for p in g["params"]]
    assert {id(p) for p in carried} == trainable
    for param in carried:
        state = new_opt.state[param]
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape
        assert state["step"] == 10
    ref_modules = dict(sora_modules(reference))
    for name, module in sora_modules(model):
        ref_state = ref_opt.state[ref_modules[name].lora_B]
        torch.testing.assert_close(new_opt.state[module.lora_B]["exp_avg"], ref_state["exp_avg"][:, keep[name]], atol=0, rtol=0)
    assert state_numel(new_opt) < state_before

    # Continue 3 steps, both with a large lambda so that the reference's dead gates stay dead.
    for optimizer in (new_opt, ref_opt):
        for group in optimizer.param_groups:
            if group.get("sora_gate"):
                group["prox_lambda"] = CONTINUE_LAMBDA
    losses = train_steps(model, new_opt, steps=3, seed=500)
    ref_losses = train_steps(reference, ref_opt, steps=3, seed=500)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    for name, ref in ref_modules.items():
        dead = torch.ones(R, dtype=torch.bool)
        dead[keep[name]] = False
        assert torch.all(ref.gate.detach()[dead] == 0), f"{name}: a dead gate revived in the reference"
        if not keep[name].numel():
            continue
        module, k = model.get_submodule(name), keep[name]
        torch.testing.assert_close(module.gate.detach(), ref.gate.detach()[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(module.lora_A.detach(), ref.lora_A.detach()[k], atol=1e-6, rtol=0)
        torch.testing.assert_close(module.lora_B.detach(), ref.lora_B.detach()[:, k], atol=1e-6, rtol=0)
        torch.testing.assert_close(new_opt.state[module.gate]["exp_avg_sq"], ref_opt.state[ref.gate]["exp_avg_sq"][k], atol=1e-9, rtol=0)
        assert new_opt.state[module.gate]["step"] == ref_opt.state[ref.gate]["step"] == 13
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_compaction_needs_a_plain_sora_optimizer(trained):
    model, _ = copy.deepcopy(trained)
    with pytest.raises(TypeError, match="plain SoRAOptimizer"):
        compact_model_and_optimizer(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))


@pytest.fixture(scope="module")
def compact_run(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compact")
    path, _ = staged_config(tmp_path, tiny_model_dir, compact=True)
    assert run(train_main, [str(path)]) == 0
    return tmp_path / "out"


def test_staged_run_with_compact_shrinks_the_physical_adapter_to_the_live_count(compact_run):
    with open(compact_run / "stages.csv", newline="") as rows:
        table = list(csv.DictReader(rows))
    assert list(table[0]) == list(COLUMNS) and len(table) == 3
    rows = json.loads((compact_run / "stages.json").read_text())
    physical = [r["adapter_params"] for r in rows]
    for row in rows:
        print(f"stage {row['stage']}: lambda {row['lambda']:.3g}, adapter {row['adapter_params']} parameters, "
              f"{row['nonzero_params']} non-zero, mean step {1000 * row['step_time_s']:.1f} ms")
        assert row["step_time_s"] > 0
        # The saved adapter of a stage is what it trained on: its tensors hold adapter_params elements.
        saved = load_file(str(compact_run / "stages" / f"stage-{row['stage']}" / "adapter" / "adapter_model.safetensors"))
        assert sum(t.numel() for k, t in saved.items() if k.endswith((".lora_A", ".lora_B", ".gate"))) == row["adapter_params"]
    # Stage 0 trains the dense adapter: r_max = 4 ranks in every module.
    stage0 = load_file(str(compact_run / "stages" / "stage-0" / "adapter" / "adapter_model.safetensors"))
    assert {t.numel() for k, t in stage0.items() if k.endswith(".gate")} == {4}
    for prev, row in zip(rows, rows[1:]):
        # Compacted to the live ranks of the previous stage: A rows + B columns (= its non-zero count) + gates.
        assert row["adapter_params"] == prev["nonzero_params"] + prev["live_ranks"]
    assert all(b <= a for a, b in zip(physical, physical[1:])) and physical[-1] < physical[0], physical
    # The final summary reports the compacted adapter's sparsity unchanged.
    assert json.loads((compact_run / "summary.json").read_text())["stages"] == rows
