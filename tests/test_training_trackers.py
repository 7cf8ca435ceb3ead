"""train.report_to end to end: a 4-step sora-train on the tiny model (evaluating every 2 steps) logs
through Accelerate to TensorBoard, MLflow, W&B (offline) and trackio; each tracker's own files are
read back and must hold the run config, every number of the run's metrics.jsonl at its step, and
the rank heatmap image at steps 2 and 4. A missing package, no network and an unknown tracker name
stop the run with one line before the model loads."""

from __future__ import annotations

import glob
import json
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, worker_env, write_config

from sora_dist.cli import run, train_main
from sora_dist.config import load_config
from sora_dist.training import trackers

STEPS, EVAL_EVERY = 4, 2
HEATMAP_STEPS = [2, 4]
PROJECT = "sora-dist"


def train_config(tmp_path: Path, model: Path, report_to) -> Path:
    return write_config(tmp_path, model, report_to=report_to, eval_every=EVAL_EVERY)


def expected(out: Path) -> dict[str, dict[int, float]]:
    """The run's own record: ``kind/name`` -> {step: value} for every number of metrics.jsonl."""
    series: dict[str, dict[int, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(f"{record['kind']}/{key}", {})[record["step"]] = value
    assert list(series["train/loss"]) == [1, 2, 3, 4] and list(series["train/lambda"]) == [1, 2, 3, 4]
    assert list(series["eval/eval_loss"]) == [2, 4]
    return series


def assert_same(logged: dict[str, dict[int, float]], want: dict[str, dict[int, float]], rel: float = 1e-12) -> None:
    for tag, values in want.items():
        assert tag in logged, f"{tag} was not logged (logged: {sorted(logged)})"
        assert sorted(logged[tag]) == sorted(values), tag
        for step, value in values.items():
            assert logged[tag][step] == pytest.approx(value, rel=rel), (tag, step)


def test_tensorboard(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(train_main, [str(train_config(tmp_path, tiny_model_dir, "tensorboard"))]) == 0
    out = tmp_path / "out"
    events = EventAccumulator(str(out / "tensorboard" / PROJECT), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert_same(logged, expected(out), rel=1e-6)  # TensorBoard stores float32
    images = events.Images(trackers.HEATMAP_TAG)
    assert [image.step for image in images] == HEATMAP_STEPS and all(image.width > 100 for image in images)
    (hparams,) = glob.glob(str(out / "tensorboard" / PROJECT / "*" / "hparams.yml"))
    config = yaml.safe_load(Path(hparams).read_text())
    assert config["train.lambda_start"] == 1.0 and config["train.report_to"] == '["tensorboard"]'


def test_mlflow(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    assert run(train_main, [str(train_config(tmp_path, tiny_model_dir, ["mlflow"]))]) == 0
    out = tmp_path / "out"
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id])
    assert found.info.run_name == "out" and found.info.status == "FINISHED"
    want = expected(out)
    logged = {tag: {m.step: m.value for m in client.get_metric_history(found.info.run_id, tag)} for tag in want}
    assert_same(logged, want)
    assert found.data.params["train.lambda_start"] == "1.0" and found.data.params["train.steps"] == str(STEPS)
    pictures = [a.path for a in client.list_artifacts(found.info.run_id, "rank_heatmap")]
    assert pictures == [f"rank_heatmap/step-{step:08d}.png" for step in HEATMAP_STEPS]


def wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (LevelDB log framing: 32 KiB blocks, 7-byte
    chunk headers of CRC, length and kind: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the end of the block
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run(train_main, [str(train_config(tmp_path, tiny_model_dir, "wandb"))]) == 0
    (path,) = glob.glob(str(tmp_path / "wandb-home" / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged: dict[str, dict[int, float]] = {}
    images, config = [], {}
    for record in wandb_records(Path(path)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in items.items():
                logged.setdefault(key, {})[record.history.step.num] = value
            if f"{trackers.HEATMAP_TAG}/_type" in items:
                images.append(record.history.step.num)
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key or "/".join(item.nested_key): item.value_json for item in updates})
    assert_same(logged, expected(tmp_path / "out"))
    assert images == HEATMAP_STEPS
    assert json.loads(config["train.lambda_start"]) == 1.0


def test_trackio(tiny_model_dir, tmp_path):
    """trackio reads its folder (TRACKIO_DIR) once, at import: the run gets a process of its own."""
    pytest.importorskip("trackio")
    config = train_config(tmp_path, tiny_model_dir, ["trackio"])
    env = dict(worker_env(), TRACKIO_DIR=str(tmp_path / "trackio"))
    proc = subprocess.run([sys.executable, "-m", "sora_dist.cli", "train", str(config)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    db = sqlite3.connect(tmp_path / "trackio" / f"{PROJECT}.db")
    logged: dict[str, dict[int, float]] = {}
    images = []
    for run_name, step, metrics in db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id"):
        assert run_name == "out"
        for key, value in json.loads(metrics).items():
            if isinstance(value, dict) and value.get("_type") == "trackio.image":
                images.append(step)
                assert (tmp_path / "trackio" / "media" / value["file_path"]).stat().st_size > 0
            else:
                logged.setdefault(key, {})[step] = value
    assert_same(logged, expected(tmp_path / "out"))
    assert images == HEATMAP_STEPS
    (stored,) = [json.loads(row[0]) for row in db.execute("SELECT config FROM configs")]
    assert stored["train.lambda_start"] == 1.0


def test_a_missing_package_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails as if it were not installed
    assert run(train_main, [str(train_config(tmp_path, tiny_model_dir, ["wandb"]))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.report_to: wandb needs the wandb package: pip install wandb (or pip install 'sora_dist[trackers]')"]
    assert not (tmp_path / "out").exists()


def test_no_network_names_the_offline_mode(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(trackers, "reachable", lambda url, timeout=trackers.PROBE_TIMEOUT_S: False)
    assert run(train_main, [str(train_config(tmp_path, tiny_model_dir, "wandb"))]) == 2
    err = capsys.readouterr().err
    assert "train.report_to: wandb cannot reach https://api.wandb.ai (no network): set WANDB_MODE=offline" in err
    monkeypatch.setenv("WANDB_MODE", "offline")
    load_config(train_config(tmp_path, tiny_model_dir, "wandb"))  # offline: no network needed


def test_an_unknown_tracker_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert run(train_main, [str(train_config(tmp_path, tiny_model_dir, ["tensorbord"]))]) == 2
    assert "train.report_to: unknown tracker 'tensorbord'; one or a list of ['tensorboard', 'wandb', 'mlflow', 'trackio'], or 'none'" in (
        capsys.readouterr().err
    )


def test_the_default_is_tensorboard_when_installed_and_none_logs_nowhere(tiny_model_dir, tmp_path, monkeypatch):
    assert load_config(train_config(tmp_path, tiny_model_dir, None)).train.report_to is None
    assert load_config(train_config(tmp_path, tiny_model_dir, "none")).train.report_to == []
    assert load_config(train_config(tmp_path, tiny_model_dir, [])).train.report_to == []
    assert trackers.active_trackers([]) == []
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert trackers.active_trackers(None) == []
    monkeypatch.delitem(sys.modules, "tensorboard")
    if trackers.installed("tensorboard"):
        assert trackers.active_trackers(None) == ["tensorboard"]


def test_flat_config_keeps_scalars_and_writes_the_rest_as_json():
    flat = trackers.flat_config({"train": {"lr": 0.1, "report_to": ["wandb"], "gate_lr": None, "resume": True}, "data": {"columns": {}}})
    assert flat == {"train.lr": 0.1, "train.report_to": '["wandb"]', "train.gate_lr": "null", "train.resume": True, "data.columns": "{}"}
