"""PNG figures for training runs: mel spectrograms of audio pairs, and the curves of a
`metrics.jsonl`. Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend)."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import torch

from .files import json_value


def _save(fig, path) -> None:
    """Lay out `fig` (tight) and write it as a PNG. tight_layout leaves a placeholder layout engine
    on the figure, for which savefig drew the whole figure once more before drawing it to the file
    (a fifth of plot_metrics' time); the layout being done, the engine is dropped (same bytes)."""
    fig.tight_layout()
    fig.set_layout_engine(None)
    fig.savefig(path)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def log_mel(audio: np.ndarray, sample_rate: int, window: int = 1024, n_mels: int = 80) -> np.ndarray:
    """(N,) audio -> (n_mels, frames) log10 mel magnitudes."""
    from .codec_losses import MelSpectrogram

    mel = MelSpectrogram(window, n_mels, sample_rate)
    with torch.no_grad():
        spec = mel(torch.as_tensor(audio, dtype=torch.float32).reshape(1, 1, -1))[0]
    return torch.log10(spec.clamp_min(1e-5)).numpy()


def save_mel_figure(path: str | os.PathLike, pairs: Sequence[tuple[np.ndarray, np.ndarray]], sample_rate: int,
                    titles: tuple[str, str] = ("input", "reconstruction")) -> str:
    """One row per (input, reconstruction) pair of 1-D signals, their log-mel spectrograms side by
    side on the same colour scale. Returns the path of the PNG."""
    fig = _figure(10, 2.2 * max(1, len(pairs)))
    for row, pair in enumerate(pairs):
        mels = [log_mel(a, sample_rate) for a in pair]
        lo, hi = min(m.min() for m in mels), max(m.max() for m in mels)
        for col, (m, title) in enumerate(zip(mels, titles)):
            ax = fig.add_subplot(len(pairs), 2, 2 * row + col + 1)
            ax.imshow(m, origin="lower", aspect="auto", vmin=lo, vmax=hi, cmap="magma",
                      extent=(0, len(pair[col]) / sample_rate, 0, m.shape[0]))
            ax.set_title(f"{title} {row}", fontsize=9)
            ax.set_xlabel("s", fontsize=8)
            ax.set_ylabel("mel bin", fontsize=8)
            ax.tick_params(labelsize=7)
    _save(fig, path)
    return str(path)


def read_metrics(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`metrics.jsonl` -> {key: (steps, values)}. A step logged twice (a run killed after its last
    checkpoint, then resumed) keeps its last value."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path) as f:
        for line in f:
            try:
                row = json_value(line)
            except ValueError:
                continue  # a line cut short by a kill
            step = row.get("step")
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    series[key][step] = float(value)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike,
                 panels: Optional[dict[str, Sequence[str]]] = None, title: str = "") -> Optional[str]:
    """Curves of `metrics.jsonl`, one panel per group of keys (default: every `loss/` key, the
    learning rate, and each `val/` key). Returns the PNG path, or None when nothing was logged."""
    series = read_metrics(metrics_path)
    if panels is None:
        panels = {"training losses": sorted(k for k in series if k.startswith("loss/")),
                  "learning rate": [k for k in ("lr", "lr_disc") if k in series]}
        panels.update({k: [k] for k in sorted(series) if k.startswith("val/")})
    panels = {name: [k for k in keys if k in series] for name, keys in panels.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(5 * cols, 3.2 * rows)
    for i, (name, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        if name == "training losses" and all(v.min() > 0 for _, v in (series[k] for k in keys)):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, png_path)
    return str(png_path)
