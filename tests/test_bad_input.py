"""Bad input to sora-train, sora-merge and sora-export (the table of tests/bad_inputs.py): each case
exits with code 2, prints one line naming the file, key, row or tensor, shows no traceback, and
changes no file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from bad_inputs import ALL_CASES, Case, build, judge, run_subprocess, tree_hash
from helpers import FP32_ATOL, REPO, WORDS, tiny_llama, word_tokenizer, worker_env, write_config
from safetensors.torch import load_file

from sora_dist import SoRAConfig, inject_sora, save_sora
from sora_dist.cli import export_main, merge_main, run, train_main


@pytest.fixture(scope="module")
def good_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A SoRA adapter (r=4 on q_proj and v_proj) of the tiny model folder's model."""
    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
    folder = tmp_path_factory.mktemp("good_adapter") / "adapter"
    save_sora(model, folder)
    return folder


def run_in_process(case: Case, argv: list[str], capsys) -> tuple[int, str]:
    command = {"train": train_main, "merge": merge_main, "export": export_main}[case.command]
    try:
        code = run(command, argv)
    except SystemExit as err:  # argparse
        code = err.code
    except Exception:  # what a user would see as a traceback
        code = 1
        print(traceback.format_exc(), file=sys.stderr)
    return code, capsys.readouterr().err


def test_the_table_covers_every_kind_of_input():
    counts = Counter(case.category for case in ALL_CASES)
    assert len(ALL_CASES) >= 150 and len({case.id for case in ALL_CASES}) == len(ALL_CASES), counts
    assert min(counts[kind] for kind in ("config", "data", "adapter", "base")) >= 10, counts


@pytest.mark.parametrize("case", [c for c in ALL_CASES if not c.subprocess_only], ids=lambda c: c.id)
def test_bad_input_gives_one_clear_line_and_changes_nothing(case, tiny_model_dir, good_adapter, tmp_path, capsys):
    """Exit code 2, one error line naming the file/key/row/tensor (the case's pattern), no traceback;
    every file of the case folder and the model folder hashes the same before and after."""
    argv = build(case, tmp_path / "case", tiny_model_dir, good_adapter)
    before = tree_hash(tmp_path / "case", tiny_model_dir)
    code, err = run_in_process(case, argv, capsys)
    after = tree_hash(tmp_path / "case", tiny_model_dir)
    assert judge(case, code, err, before, after) == "clear", f"exit {code}, pattern {case.message!r}\n{err[-3000:]}"


@pytest.mark.parametrize("name", ["--set value not YAML", "JSONL latin-1 byte", "label 5 of 2 classes", "r 1e9",
                                  "ACCELERATE_USE_CPU with a DeepSpeed config"])
def test_a_real_subprocess_agrees(name, tiny_model_dir, good_adapter, tmp_path):
    """The in-process runner above cross-checked: the installed command line, a process of its own."""
    case = next(c for c in ALL_CASES if c.name == name and c.command == "train")
    argv = build(case, tmp_path / "case", tiny_model_dir, good_adapter)
    before = tree_hash(tmp_path / "case", tiny_model_dir)
    code, err = run_subprocess(case, argv)
    assert judge(case, code, err, before, tree_hash(tmp_path / "case", tiny_model_dir)) == "clear", err[-3000:]


def test_a_killed_writes_temporary_folder_is_removed_by_the_next_write(tmp_path):
    """A save or merge killed mid-write leaves .NAME.tmp-<host>-<pid>-* behind; the next write of the
    same target removes it when that process is gone, and leaves a live process's alone."""
    import socket
    import subprocess
    import sys

    from sora_dist.deploy.atomic import write_folder

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{int(gone.stdout)}-abc123"
    live = tmp_path / f".out.tmp-{host}-{__import__('os').getpid()}-def456"
    other_host = tmp_path / f".out.tmp-elsewhere-{int(gone.stdout)}-ghi789"
    for folder in (stale, live, other_host):
        folder.mkdir()
        (folder / "part").write_text("half written")
    write_folder(tmp_path / "out", lambda tmp: (tmp / "done").write_text("ok"))
    assert (tmp_path / "out" / "done").read_text() == "ok"
    assert not stale.exists() and live.exists() and other_host.exists()


def test_an_adapter_with_nan_values_is_never_written(tmp_path):
    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, target_modules=["q_proj"]), verbose=False)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"not written: adapter tensor 'model\.layers\.1\.self_attn\.q_proj\.lora_B' holds NaN"):
        save_sora(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.iterdir())


# --- several processes: one failure ends the run quickly, with one line ----------------------------


def launched(config: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sora_dist.cli", "train", str(config)]


def our_lines(stderr: str) -> tuple[list[str], list[str]]:
    """(the error lines, the traceback frames of our processes): torchrun's own failure summary
    (a ChildFailedError traceback from the launcher process) is the launcher's, not ours."""
    frames = [line for line in stderr.splitlines() if line.strip().startswith("File ") and "torch/distributed/" not in line
              and "<frozen runpy>" not in line]  # fmt: skip
    return [line for line in stderr.splitlines() if line.startswith("error: ")], frames


@pytest.mark.parametrize("fault", ["rank 0 meets a bad row while rank 1 waits", "every rank meets a bad config value"])
def test_a_rank_failing_at_start_up_ends_the_run_with_one_line(fault, tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(config.read_text())
    if fault.startswith("rank 0"):
        # The main process tokenizes first; rank 1 waits in a barrier until it is done.
        with open(raw["data"]["train_file"], "a") as rows:
            rows.write('{"instruction": "w1 w2"}\n')
        message = r"instructions\.jsonl:row 25: missing field 'output'"
    else:
        (tmp_path / "plain_file").write_text("a file\n")
        raw["train"]["output_dir"] = str(tmp_path / "plain_file" / "out")
        message = r"train\.output_dir: cannot create .*plain_file/out: .*plain_file is a file"
    config.write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    proc = subprocess.run(launched(config), cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    errors, frames = our_lines(proc.stderr)
    assert proc.returncode != 0 and seconds < 30, (seconds, proc.stderr[-3000:])
    assert len(errors) == 1 and re.search(message, errors[0]) and not frames, proc.stderr[-3000:]


def test_a_rank_killed_mid_step_ends_the_run_with_one_line(tiny_model_dir, tmp_path):
    """kill -9 of rank 1 during training: rank 0 loses its peer in the next collective, says so in
    one line and exits; the launcher stops the rest. Everything ends within 30 s."""
    config = write_config(tmp_path, tiny_model_dir, steps=5000, log_every=1)
    proc = subprocess.Popen(launched(config), cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no step"
        time.sleep(0.2)
    victim = rank_pid(config, 1)
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    seconds = time.monotonic() - killed
    errors, frames = our_lines(stderr)
    assert proc.returncode != 0 and seconds < 30, (seconds, stderr[-3000:])
    assert len(errors) <= 1 and not frames, stderr[-3000:]
    assert errors == [] or "lost contact with another process" in errors[0] or "SIGTERM" in errors[0], errors
    assert "Signal 9 (SIGKILL)" in stderr  # the launcher's summary names the killed rank


def rank_pid(config: Path, rank: int) -> int:
    """The pid of the worker process of ``rank`` running ``config`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in cmdline and f"RANK={rank}".encode() in environ and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in environ):
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} found")


# --- valid input that must keep working ----------------------------------------------------------


def test_csv_text_columns_stay_text(tmp_path):
    """A CSV whose answers are numbers: the reader guesses int64, the text fields are read as text."""
    from sora_dist.data.pipeline import load_sources, prepare_split

    path = tmp_path / "qa.csv"
    path.write_text("instruction,output\nw1 w2,42\nw3 w4,7\n")
    raw = load_sources([str(path)], "data.train_file", "instruction", None, None, 0)
    assert [row["output"] for row in raw] == ["42", "7"]
    (tmp_path / "na.csv").write_text("instruction,output\nw1 w2,007\nw3 w4,NA\n")
    raw = load_sources([str(tmp_path / "na.csv")], "data.train_file", "instruction", None, None, 0)
    assert [row["output"] for row in raw] == ["007", "NA"]  # NA is an answer, not a missing value
    tokenizer = word_tokenizer(WORDS + ["42", "7", "NA"])
    examples = prepare_split([str(path)], "data.train_file", tokenizer, "instruction", 32, cache=False)
    first = examples[0]
    assert tokenizer.decode([t for t in first["labels"] if t != -100]) == "42 </s>"


def test_save_every_needs_no_output_dir_when_the_cli_gives_one(tmp_path):
    from sora_dist.config import load_config

    raw = {"model": {"path": "m"}, "data": {"train_file": "t.jsonl"}, "train": {"steps": 4, "save_every": 2}}
    config = load_config(raw=raw, default_output_dir=str(tmp_path / "runs" / "x"))
    assert config.train.output_dir == str(tmp_path / "runs" / "x") and config.train.save_every == 2


def test_skipped_rows_are_counted_through_the_validation_split_and_file(tiny_model_dir, tmp_path):
    """data.on_error skip: the file's bad rows are counted once (with the training part) after a
    held-out split, and a validation file's bad rows are counted on their own."""
    from sora_dist.config import load_config
    from sora_dist.recipe import run_training

    config = write_config(tmp_path, tiny_model_dir, steps=1)
    raw = yaml.safe_load(config.read_text())
    with open(raw["data"]["train_file"], "a") as rows:
        rows.write('{"instruction": "w1"}\n{"instruction": "w2", "output": 3}\n')
    raw["data"].update(on_error="skip", num_proc=1)
    summary = run_training(load_config(raw=raw), tmp_path / "split")
    assert (summary["skipped_rows"], summary["validation_skipped_rows"]) == (2, 0)
    assert summary["train_examples"] + summary["validation_examples"] == 24

    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"instruction": "w1", "output": "w2"}\n{"output": "w3"}\n{"instruction": "w4", "output": "w5"}\n')
    raw["data"].update(validation_fraction=0.0, validation_file=str(valid))
    summary = run_training(load_config(raw=raw), tmp_path / "file")
    assert (summary["skipped_rows"], summary["validation_skipped_rows"], summary["validation_examples"]) == (2, 1, 2)
    assert list(summary["validation_skipped"]) == [f"{valid}:row 2"]


def test_an_update_that_is_not_finite_stops_naming_the_parameter_and_key(tmp_path):
    """The loss (computed before the update) can be finite while the update is not: the guard
    checks the trained parameters too and names the first bad one and the key of its rate."""
    from accelerate import Accelerator

    from sora_dist.training.config import TrainConfig
    from sora_dist.training.guard import FiniteGuard, NonFiniteLoss

    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, target_modules=["q_proj"]), verbose=False)
    guard = FiniteGuard(Accelerator(cpu=True), TrainConfig(steps=3), model)
    guard.observe(torch.tensor(2.0), 1)
    guard.check(1)  # all finite
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B[0, 0] = float("inf")
    with pytest.raises(NonFiniteLoss, match=r"step 2 or before made parameter model\.layers\.1\.self_attn\.q_proj\.lora_B NaN or inf .* lower train\.lr"):
        guard.check(2)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B.zero_()
        model.model.layers[0].self_attn.q_proj.gate[1] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"parameter model\.layers\.0\.self_attn\.q_proj\.gate .* lower train\.gate_lr"):
        guard.check(3)


def test_a_deepspeed_config_runs_without_a_launcher(tiny_model_dir, tmp_path):
    """distributed.deepspeed_config under plain sora-train: a world of one process, ZeRO-2 on the
    CPU; its adapter matches the plain PyTorch run of the same config (fp32)."""
    config = write_config(tmp_path, tiny_model_dir, steps=2)
    raw = yaml.safe_load(config.read_text())
    raw["sora"]["dropout"] = 0.0
    raw["data"]["num_proc"] = 1
    for name, extra in (("plain", {}), ("zero2", {"deepspeed_config": str(REPO / "ds_configs" / "zero2.json")})):
        raw["train"]["output_dir"] = str(tmp_path / name)
        raw["distributed"] = extra
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        proc = subprocess.run([sys.executable, "-m", "sora_dist.cli", "train", str(tmp_path / f"{name}.yaml")], cwd=REPO,
                              env=worker_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    plain = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    zero2 = load_file(str(tmp_path / "zero2" / "adapter" / "adapter_model.safetensors"))
    assert plain.keys() == zero2.keys()
    for key in plain:
        torch.testing.assert_close(zero2[key], plain[key], atol=FP32_ATOL, rtol=0)


def test_a_killed_merge_leaves_no_temporary_folder_after_the_next_one(tmp_path):
    """kill -9 of sora-merge while it writes: the output folder does not exist, only its temporary
    sibling; the next merge of the same --out writes the model and removes that sibling."""
    model = tiny_llama(seed=0, hidden_size=256, intermediate_size=1024, num_hidden_layers=6)
    model.save_pretrained(tmp_path / "base")
    inject_sora(model, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
    save_sora(model, tmp_path / "adapter")
    cmd = [sys.executable, "-m", "sora_dist.cli", "merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
           "--out", str(tmp_path / "merged")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list(tmp_path.glob(".merged.tmp-*/*.safetensors")):
        time.sleep(0.002)
    assert proc.poll() is None, "the merge ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".merged.tmp-*")) and not (tmp_path / "merged").exists()
    subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, check=True, timeout=300)
    assert (tmp_path / "merged" / "model.safetensors").is_file() and not list(tmp_path.glob(".merged.tmp-*"))
