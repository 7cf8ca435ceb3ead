"""Pictures of sparsity (need matplotlib): live rank per layer and module, the sparsifying-schedule
curves, and budget mode's live size and λ against the step."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..core.report import SparsityReport

LAYER_INDEX = re.compile(r"\.(\d+)\.")


def rank_grid(report: SparsityReport) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, module kinds, live rank[layer][kind]) from names like ``model.layers.3.mlp.up_proj``.

    A module without a layer number goes to layer -1; a missing (layer, kind) pair is NaN.
    """
    cells: dict[tuple[int, str], int] = {}
    for module in report.modules:
        match = LAYER_INDEX.search(module.name)
        layer = int(match.group(1)) if match else -1
        kind = module.name[match.end() :] if match else module.name
        cells[(layer, kind)] = module.live_rank
    layers = sorted({layer for layer, _ in cells})
    kinds = sorted({kind for _, kind in cells}, key=lambda k: [m.name.endswith(k) for m in report.modules].index(True))
    grid = [[float(cells.get((layer, kind), float("nan"))) for kind in kinds] for layer in layers]
    return layers, kinds, grid


def rank_heatmap(report: SparsityReport, path: str | os.PathLike, title: str = "SoRA live rank per layer") -> Path:
    """Write a PNG heatmap: layers down, module kinds across, colour = live rank (of r_max)."""
    return _save(rank_heatmap_figure(report, title), path)


def rank_heatmap_figure(report: SparsityReport, title: str = "SoRA live rank per layer"):
    """The matplotlib figure of :func:`rank_heatmap` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, kinds, grid = rank_grid(report)
    r_max = max((m.r_max for m in report.modules), default=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.28 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=r_max)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\n{report.params:,} of {report.dense_params:,} adapter parameters kept", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"live rank (r_max = {r_max})")
    fig.tight_layout()
    return fig


def figure_pixels(fig, dpi: int = 110):
    """A figure rendered as an RGB uint8 array (height, width, 3), as image loggers take it."""
    import numpy as np

    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def stage_curves(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write the sparsifying-schedule curves: generalization and memorization (% of stage 0)
    against the non-zero adapter parameters of each stage, each point labelled with its λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    params = [row["nonzero_params"] for row in rows]
    for key, marker, data in (("generalization", "o-", "validation"), ("memorization", "s--", "training subset")):
        values = [float("nan") if row[key] is None else row[key] for row in rows]
        ax.plot(params, values, marker, label=f"{key} ({data})")
    for row in rows:
        ax.annotate(f"λ={row['lambda']:.3g}", (row["nonzero_params"], row["generalization"] or 0.0), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))  # fmt: skip
    ax.set_xlabel("non-zero adapter parameters")
    ax.set_ylabel(f"% of stage 0 ({rows[0]['score']})")
    ax.set_title("SoRA sparsifying schedule", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_budget(metrics_path: str | Path, out_path: str | Path, controller=None, unit: str = "adapter_params") -> Path | None:
    """``budget.png``: λ and the live count against the step, from ``metrics.jsonl`` (train records).

    ``unit`` is the metrics key of the live count (``adapter_params`` or ``live_ranks``); with a
    ``controller`` (a BudgetController) its planned trajectory and target are drawn too. Returns None without records.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("kind") == "train" and "lambda" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    top.plot(steps, [r[unit] for r in records], marker=".", label="live ranks" if unit == "live_ranks" else "non-zero adapter parameters")
    if controller is not None:
        grid = list(range(0, max(max(steps), controller.by_step) + 1))
        top.plot(grid, [controller.reference(s) for s in grid], "--", color="gray", label="planned")
        top.axhline(controller.target, color="red", lw=0.8, label="target")
        top.axvline(controller.by_step, color="red", lw=0.8, ls=":")
    top.set_ylabel(unit)
    top.legend()
    bottom.plot(steps, [r["lambda"] for r in records], marker=".", color="tab:orange")
    bottom.set_ylabel("λ")
    bottom.set_xlabel("optimizer step")
    fig.suptitle("budget mode: live size and λ")
    return _save(fig, out_path)


def _save(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
