"""Experiment trackers (``train.report_to``) through Accelerate's tracking API.

The Accelerator is built with ``log_with`` (backends/accelerate.py); the recipe starts the runs
with ``accelerator.init_trackers`` (the flattened run config once), the loop logs its metrics with
``accelerator.log`` and the rank heatmap with :func:`log_heatmap`, and the end of the run calls
``accelerator.end_training``. Whether a tracker can work here (its package, the network or the
offline mode it needs) is checked when the config loads, before the model does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from urllib.parse import urlparse

from ..options import ConfigError, one_line

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
NO_TRACKER = "none"
HEATMAP_TAG = "sparsity/rank_heatmap"
PROBE_TIMEOUT_S = 3.0


def normalize_report_to(value) -> list[str] | None:
    """``train.report_to`` as a list of tracker names (None stays None: tensorboard when installed)."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    if names == [NO_TRACKER]:
        return []
    for name in names:
        if name == NO_TRACKER:
            raise ConfigError(f"TrainConfig.report_to: {NO_TRACKER!r} cannot be combined with trackers, got {names}")
        if name not in TRACKERS:
            raise ConfigError(f"TrainConfig.report_to: unknown tracker {name!r}; one or a list of {list(TRACKERS)}, or {NO_TRACKER!r}")
    return list(dict.fromkeys(names))


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def active_trackers(report_to: list[str] | None) -> list[str]:
    """The trackers a run logs to: the configured ones, or by default tensorboard where it is installed."""
    if report_to is None:
        return ["tensorboard"] if installed(PACKAGES["tensorboard"]) else []
    return list(report_to)


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the host of ``url`` opens within ``timeout`` seconds."""
    parsed = urlparse(url)
    if not parsed.hostname:
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() in ("offline", "dryrun", "disabled")


def check_trackers(report_to: list[str] | None) -> None:
    """Each configured tracker can log from here: its package is installed, and a tracker that sends
    to a server can reach it (or is told to stay local). One ConfigError line says what to do."""
    if report_to:
        from accelerate import __version__ as accelerate_version
        from accelerate.utils import LoggerType

        supported = {str(kind) for kind in LoggerType}
        for name in report_to:
            if name not in supported:
                raise ConfigError(f"train.report_to: accelerate {accelerate_version} has no {name} tracker: pip install -U accelerate")
    for name in report_to or []:
        package = PACKAGES[name]
        if not installed(package):
            raise ConfigError(f"train.report_to: {name} needs the {package} package: pip install {package} (or pip install 'sora_dist[trackers]')")
        if name == "wandb" and not offline("WANDB_MODE"):
            server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            if not reachable(server):
                raise ConfigError(f"train.report_to: wandb cannot reach {server} (no network): set WANDB_MODE=offline to log locally "
                                  "(wandb sync the run folder later)")  # fmt: skip
        if name == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI", "")
            if uri.startswith(("http://", "https://")) and not reachable(uri):
                raise ConfigError(f"train.report_to: mlflow cannot reach MLFLOW_TRACKING_URI={uri} (no network): "
                                  "set MLFLOW_TRACKING_URI=file:./mlruns to log to a local store")  # fmt: skip
        if name == "trackio":
            remote = os.environ.get("TRACKIO_SERVER_URL") or ("https://huggingface.co" if os.environ.get("TRACKIO_SPACE_ID") else "")
            if remote and not reachable(remote):
                raise ConfigError(f"train.report_to: trackio cannot reach {remote} (no network): unset TRACKIO_SPACE_ID and "
                                  "TRACKIO_SERVER_URL to log to the local database (TRACKIO_DIR)")  # fmt: skip


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as ``section.key`` -> bool, int, float or str (lists, mappings and None as JSON text)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def start_trackers(accelerator, project: str, run_name: str, output_dir: str, config: dict) -> None:
    """``accelerator.init_trackers`` for the trackers the Accelerator was built with; every rank calls it."""
    if not accelerator.log_with:
        return
    names = {str(tracker) for tracker in accelerator.log_with}
    init_kwargs: dict = {}
    if "wandb" in names:
        init_kwargs["wandb"] = {"name": run_name, **({} if os.environ.get("WANDB_DIR") else {"dir": str(output_dir)})}
    if "mlflow" in names:
        init_kwargs["mlflow"] = {"run_name": run_name}
    if "trackio" in names:
        init_kwargs["trackio"] = {"name": run_name}
    try:
        accelerator.init_trackers(project, config=flat_config(config), init_kwargs=init_kwargs)
    except Exception as err:
        raise ConfigError(f"train.report_to: could not start {' / '.join(sorted(names))}: {one_line(err, innermost=True, limit=800)}") from err


def tracker_scalars(kind: str, values: dict) -> dict:
    """The numbers of one metrics record as ``kind/name`` (the tags TensorBoard showed before)."""
    return {f"{kind}/{key}": value for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def heatmap_wanted(accelerator) -> bool:
    """True on every rank when the run logs to a tracker (the heatmap's sparsity report is a collective)."""
    return bool(getattr(accelerator, "log_with", None))


def log_heatmap(accelerator, report, step: int) -> None:
    """The rank-per-layer heatmap as an image in each tracker that takes one (main process only)."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    from ..sparsity.plots import figure_pixels, rank_heatmap_figure

    try:
        figure = rank_heatmap_figure(report)
    except ImportError:
        return
    try:
        pixels = figure_pixels(figure)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.tracker.add_image(HEATMAP_TAG, pixels, global_step=step, dataformats="HWC")
                tracker.tracker.flush()
            elif tracker.name == "wandb":
                tracker.log_images({HEATMAP_TAG: [pixels]}, step=step)
            elif tracker.name == "mlflow":
                tracker.log_figure(figure, f"rank_heatmap/step-{step:08d}.png")
            elif tracker.name == "trackio":
                import trackio

                tracker.log({HEATMAP_TAG: trackio.Image(pixels, caption=f"live rank per layer at step {step}")}, step=step)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
