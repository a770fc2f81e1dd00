"""PNG figures for training runs: mel spectrograms of audio pairs, and the curves of a
`metrics.jsonl`. Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend)."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np
import torch

from .files import json_value, replace_atomically


# Margins and gaps of a figure's grid of panels, in inches: room for the tick labels and axis label
# on the left and below, and each panel's title above (fonts of 7-10 points, as drawn here).
MARGINS_IN = {"left": 0.75, "right": 0.25, "bottom": 0.5, "top": 0.45, "suptitle": 0.35,
              "wspace": 0.9, "hspace": 0.85}


def _save(fig, path) -> None:
    """Lay `fig`'s grid of panels out with fixed margins (MARGINS_IN) and write it as a PNG.
    matplotlib's tight_layout measured every tick label's extent first: a third of a curve
    figure's time (~0.5 s at the end of each run), for margins that these figures' fixed fonts
    make the same each time."""
    width, height = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry() if fig.axes else (1, 1)
    m = MARGINS_IN
    top = m["top"] + (m["suptitle"] if fig._suptitle is not None else 0.0)
    axis_w = (width - m["left"] - m["right"] - (cols - 1) * m["wspace"]) / cols
    axis_h = (height - m["bottom"] - top - (rows - 1) * m["hspace"]) / rows
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["bottom"] / height,
                        top=1 - top / height, wspace=m["wspace"] / axis_w, hspace=m["hspace"] / axis_h)
    # through a temporary renamed into place: a kill or a full disk while it is drawn left a truncated
    # PNG, which a finished run never redraws
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))


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
    checkpoint, then resumed) keeps its last value. A line that is not a JSON object of a step (cut
    short by a kill, a byte damaged on disk or by an editor) is left out: the curves are drawn at the
    end of a run, after its last save, where a UnicodeDecodeError was a traceback."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path, encoding="utf-8", errors="replace") as f:  # (a damaged byte: U+FFFD, the line left out below)
        for line in f:
            try:
                row = json_value(line)
            except ValueError:
                continue  # a line cut short by a kill
            if not isinstance(row, dict) or "\ufffd" in line:
                continue
            step = row.get("step")
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    series[key][step] = float(value)
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike,
                 panels: Optional[dict[str, Sequence[str]]] = None, title: str = "") -> Optional[str]:
    """Curves of `metrics.jsonl`, one panel per group of keys (default: every `loss/` key, the
    learning rate, and each `val/` key with its `val_raw/` one where logged). Returns the PNG path, or None when nothing was logged (or
    the file is gone: deleted with the run folder's tidying while the run went on)."""
    if not os.path.isfile(metrics_path):
        return None
    series = read_metrics(metrics_path)
    if panels is None:
        panels = {"training losses": sorted(k for k in series if k.startswith("loss/")),
                  "learning rate": [k for k in ("lr", "lr_disc") if k in series]}
        # each validation metric with its val_raw/ twin (the training weights', beside a weight average's)
        panels.update({k: [k, "val_raw/" + k[4:]] for k in sorted(series) if k.startswith("val/")})
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
