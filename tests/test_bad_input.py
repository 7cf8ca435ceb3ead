"""Bad input to sora-merge, sora-export and the readers behind them: each case exits with code 2,
prints one line naming the file, key or tensor, shows no traceback, and changes no file."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import load_file, save_file

from sora_dist import SoRAConfig, inject_sora, save_sora
from sora_dist.backends.accelerate import load_ds_config
from sora_dist.cli import export_main, merge_main, run


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    model = tiny_llama(seed=0)
    model.save_pretrained(root / "base")
    inject_sora(model, SoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), verbose=False)
    save_sora(model, root / "adapter")
    return root / "base", root / "adapter"


def tree_hash(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(file).encode() + file.read_bytes())
    return digest.hexdigest()


def broken_adapter(adapter: Path, tmp_path: Path, change) -> Path:
    """A copy of ``adapter`` with ``change(meta, tensors, folder)`` applied."""
    folder = tmp_path / "broken"
    folder.mkdir()
    meta = json.loads((adapter / "sora_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    meta, tensors = change(meta, tensors, folder)
    if meta is not None:
        (folder / "sora_config.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    if tensors is not None:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


Q = "model.layers.0.self_attn.q_proj"


def _truncated(meta, tensors, folder):
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return meta, None


CASES = {
    "config is a list": (lambda m, t, f: ([m], t), r"sora_config\.json: not a sora_dist adapter config \(format='list'\)"),
    "config lacks modules": (lambda m, t, f: ({k: v for k, v in m.items() if k != "modules"}, t), r"sora_config\.json: 'modules' must be a dict"),
    "config lacks base_model": (lambda m, t, f: ({k: v for k, v in m.items() if k != "base_model"}, t), r"'base_model' must be a dict"),
    "module spec without rank": (lambda m, t, f: ({**m, "modules": {**m["modules"], Q: {"in_features": 64}}}, t), rf"modules\.{Q} must give the numbers"),
    "config not JSON": (lambda m, t, f: ("{not json", t), r"sora_config\.json:1: invalid JSON"),
    "gate tensor missing": (lambda m, t, f: (m, {k: v for k, v in t.items() if k != f"{Q}.gate"}), rf"tensor '{Q}\.gate' is missing"),
    "lora_A transposed": (lambda m, t, f: (m, {**t, f"{Q}.lora_A": t[f"{Q}.lora_A"].t().contiguous()}), rf"tensor '{Q}\.lora_A' has shape \[64, 4\], expected \[4, 64\]"),
    "NaN in lora_B": (lambda m, t, f: (m, {**t, f"{Q}.lora_B": torch.full_like(t[f"{Q}.lora_B"], float("nan"))}), rf"tensor '{Q}\.lora_B' holds NaN or inf"),
    "truncated safetensors": (_truncated, r"adapter_model\.safetensors: cannot be read as safetensors"),
}


@pytest.mark.parametrize("command", ["merge", "export"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_adapter_is_refused_naming_what_is_wrong(case, command, base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    change, message = CASES[case]
    broken = broken_adapter(adapter, tmp_path, change)
    before = tree_hash(base, broken)
    args = ["--adapter", str(broken), "--out", str(tmp_path / "out")]
    code = run(merge_main, ["--base", str(base), *args]) if command == "merge" else run(export_main, args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(message, err), err
    assert tree_hash(base, broken) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["adapter", "adapter/inner", "base", "."])
def test_an_output_overlapping_an_input_is_refused_even_with_force(out, base_and_adapter, capsys):
    """sora-merge reads --base and --adapter, sora-export only --adapter: an --out that is, holds or
    lies inside one of its inputs is refused before anything is read or written."""
    base, adapter = base_and_adapter
    before = tree_hash(base, adapter)
    target = str(adapter.parent / out)
    assert run(merge_main, ["--base", str(base), "--adapter", str(adapter), "--out", target, "--force"]) == 2
    assert "overlaps" in capsys.readouterr().err
    if out != "base":
        assert run(export_main, ["--adapter", str(adapter), "--out", target, "--force"]) == 2
        assert "overlaps --adapter" in capsys.readouterr().err
    assert tree_hash(base, adapter) == before


def test_a_deepspeed_config_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"ds\.json: a DeepSpeed config is a JSON object"):
        load_ds_config(path)


def test_an_invalid_target_regex_is_a_config_error():
    from sora_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"sora\.target_modules: '\[' is not a valid regular expression"):
        load_config(raw={"model": {"path": "m"}, "data": {"train_file": "t.jsonl"}, "sora": {"target_modules": "["}})


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
