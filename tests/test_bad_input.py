"""Bad input to sora-train, sora-merge and sora-export (the table of tests/bad_inputs.py): each case
exits with code 2, prints one line naming the file, key, row or tensor, shows no traceback, and
changes no file."""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from bad_inputs import ALL_CASES, Case, build, judge, run_subprocess, tree_hash
from helpers import tiny_llama

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


@pytest.mark.parametrize("name", ["--set value not YAML", "JSONL latin-1 byte", "label 5 of 2 classes", "r 1e9"])
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
