"""Pictures of a SoRA adapter: effective rank per layer and module (needs matplotlib)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .sparsity import SparsityReport

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
